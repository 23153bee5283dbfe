"DS2Net model: sizes, shapes, gradients and weight loading (spec sections 2 and 3)."
import os, re, subprocess, sys
import pytest, timm, torch
import torch.nn.functional as F
from ds2net.blocks import DEM, SEM
from timm.layers import DropPath
from ds2net.model import (DS2Net, TINY_ENCODER, SIDE_OUTPUT_NAMES, WeightsError, count_parameters, count_flops, load_reference_checkpoint,
                          reference_state_dict, _original_pvt_name)


@pytest.fixture(scope='module')
def paper():
    torch.manual_seed(0)
    return DS2Net('pvt_v2_b2', channels=32).eval()


def test_parameter_counts(paper):
    c = count_parameters(paper)
    assert c['total'] == 24_917_936
    assert c['decoder'] == 68_080
    assert c['encoder'] == 24_849_856
    assert c['translation'] + c['detail_path'] + c['semantic_path'] + c['heads'] == c['decoder']


def test_flops_match_spec(paper):
    assert abs(count_flops(paper, 352) / 1e9 - 21.2) < 0.1


@pytest.mark.parametrize('size', [(352, 352), (300, 260)])
def test_six_outputs_at_input_size(paper, size):
    with torch.no_grad(): outs = paper(torch.randn(2, 3, *size))
    assert isinstance(outs, tuple) and len(outs) == 6
    for o in outs: assert o.shape == (2, 1, *size) and torch.isfinite(o).all()


def test_forward_with_masks(paper):
    x = torch.randn(1, 3, 352, 352)
    with torch.no_grad(): o = paper.forward_with_masks(x)
    assert [m.shape[-1] for m in o.detail_masks] == [22, 44, 88]
    assert [m.shape[-1] for m in o.semantic_masks] == [22, 44, 88]
    for m in o.detail_masks + o.semantic_masks: assert m.shape[1] == 1 and 0 <= m.min() and m.max() <= 1
    torch.testing.assert_close(o.fused, sum(o.side_outputs))
    with torch.no_grad(): torch.testing.assert_close(paper.predict_proba(x), torch.sigmoid(sum(paper(x))))


def test_side_outputs_are_their_heads_on_d1_d2_d3_s1_s2_s3():
    "Output n is head n applied to the n-th of (d1, d2, d3, s1, s2, s3), upsampled to the input: read off with hooks."
    torch.manual_seed(3)
    model = DS2Net(TINY_ENCODER, channels=16).eval()
    seen = {}
    for name, blocks in (('d', model.detail_path), ('s', model.semantic_path)):
        for i, block in enumerate(blocks):
            block.register_forward_hook(lambda m, inp, out, key=f'{name}{i + 1}': seen.__setitem__(key, out[0] if isinstance(out, tuple) else out))
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad(): outs = model(x)
    for n, key in enumerate(SIDE_OUTPUT_NAMES):
        with torch.no_grad():
            expected = F.interpolate(model.heads[n](seen[key]), size=(96, 64), mode='bilinear', align_corners=False)
        torch.testing.assert_close(outs[n], expected, msg=f'output {n} is not head {n} on {key}')
    # the detail and semantic maps sit at strides 16, 8, 4
    assert [seen[k].shape[-1] for k in SIDE_OUTPUT_NAMES] == [64 // s for s in (16, 8, 4, 16, 8, 4)]


def test_bad_input_is_explained(paper):
    with pytest.raises(ValueError, match=r'expects a batch of images \(B, 3, H, W\), got \(3, 64, 64\)'): paper(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match='at least 32'): paper(torch.randn(1, 3, 16, 64))


@pytest.mark.parametrize('encoder,kwargs', [('pvt_v2_b2', {}), (TINY_ENCODER, dict(zero_init_last=False))])
def test_gradients_reach_every_parameter(encoder, kwargs):
    torch.manual_seed(0)
    # (timm ResNets zero-initialise each block's last BatchNorm, which blocks the gradient of the convs before it
    # at step 0; `zero_init_last=False` turns that off so the test sees every path.)
    model = DS2Net(encoder, **kwargs).train()
    # Dropout2d on a one-channel map zeroes the SEM's whole spatial map half of the time (then the 7×7 conv gets
    # no gradient, by design); evaluate it as the identity here so every parameter must get a gradient.
    # Stochastic depth (PVTv2's drop_path_rate 0.1) may skip a block for both images; evaluate it as the identity too.
    for m in model.modules():
        if isinstance(m, (torch.nn.Dropout2d, DropPath)): m.eval()
    x, y = torch.randn(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.5).float()
    sum(F.binary_cross_entropy_with_logits(o, y) for o in model(x)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []


def test_dem_without_residual_is_only_gated_features():
    torch.manual_seed(0)
    dem = DEM(16, kernel_size=7, residual=False)
    high, low = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 16, 16)
    out, mask = dem(high, low, return_mask=True)
    up = F.interpolate(high, scale_factor=2, mode='bilinear', align_corners=True)
    gated = dem.fuse(torch.cat([up, low], 1)) * mask
    torch.testing.assert_close(out, gated)
    dem.residual = True
    torch.testing.assert_close(dem(high, low), gated + low)


def test_dem_mask_is_spec_formula():
    torch.manual_seed(1)
    dem = DEM(8, kernel_size=5)
    low = torch.randn(2, 8, 12, 12)
    a, b = dem.detail_conv_a.weight, dem.detail_conv_b.weight
    expected = torch.sigmoid(F.conv2d(F.conv2d(low.max(1, keepdim=True).values, a, padding=2), b, padding=2))
    torch.testing.assert_close(dem.detail_mask(low), expected)


def test_sem_is_spec_formula_in_eval():
    torch.manual_seed(2)
    sem = SEM(32).eval()
    high, low = torch.randn(2, 32, 6, 6), torch.randn(2, 32, 12, 12)
    up = F.interpolate(high, scale_factor=2, mode='bilinear', align_corners=True)
    sa = torch.sigmoid(sem.spatial_conv(torch.cat([up.mean(1, keepdim=True), up.max(1, keepdim=True).values], 1)))
    mask = torch.sigmoid(sem.mask_conv(sa))
    x = low * mask
    fc1, fc2 = sem.channel_mlp[0].weight, sem.channel_mlp[2].weight
    mlp = lambda v: F.conv2d(F.relu(F.conv2d(v, fc1)), fc2)
    x = x * torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
    out, m = sem(high, low, return_mask=True)
    torch.testing.assert_close(m, mask)
    torch.testing.assert_close(out, x + up)


def _reference_keys_ok(ref):
    assert any(k.startswith('backbone1.patch_embed1.') for k in ref)
    assert any(k.startswith('backbone1.block4.2.') for k in ref)
    assert 'backbone1.norm4.weight' in ref
    for k in ['Translayer1_0.conv.0.weight', 'Translayer1_3.conv.1.num_batches_tracked', 'DEM3.conv_pool.2.bias',
              'DEM1.conv1.weight', 'DEM2.conv2.weight', 'SEM3.sa.conv1.weight', 'SEM1.ca.fc1.weight', 'SEM2.ca.fc2.weight',
              'SEM2.conv1.bias', 'output_conv6.weight', 'output_conv1.bias']:
        assert k in ref, k


def test_reference_checkpoint_round_trip(paper, tmp_path):
    ref = reference_state_dict(paper)
    _reference_keys_ok(ref)
    path = tmp_path / 'DS2Net-best.pth'
    torch.save(ref, path)
    before = path.read_bytes()
    torch.manual_seed(123)
    fresh = load_reference_checkpoint(DS2Net('pvt_v2_b2'), path).eval()
    x = torch.randn(1, 3, 352, 352)
    with torch.no_grad():
        diff = max((a - b).abs().max().item() for a, b in zip(paper(x), fresh(x)))
    assert diff <= 1e-4
    assert path.read_bytes() == before  # the user's file is untouched


def test_reference_checkpoint_errors_name_the_key(paper, tmp_path):
    ref = reference_state_dict(paper)
    missing = dict(ref); del missing['SEM2.ca.fc1.weight']
    torch.save(missing, tmp_path / 'missing.pth')
    with pytest.raises(WeightsError, match=r'missing keys \(1\): SEM2\.ca\.fc1\.weight'):
        load_reference_checkpoint(DS2Net('pvt_v2_b2'), tmp_path / 'missing.pth')
    wrong = dict(ref); wrong['DEM1.conv_pol.0.weight'] = wrong.pop('DEM1.conv_pool.0.weight')
    torch.save(wrong, tmp_path / 'wrong.pth')
    with pytest.raises(WeightsError, match=r'unexpected keys \(1\): DEM1\.conv_pol\.0\.weight') as e:
        load_reference_checkpoint(DS2Net('pvt_v2_b2'), tmp_path / 'wrong.pth')
    assert 'DEM1.conv_pool.0.weight' in str(e.value)  # and the key it lacks
    shape = dict(ref); shape['output_conv1.weight'] = torch.zeros(1, 64, 1, 1)
    torch.save(shape, tmp_path / 'shape.pth')
    with pytest.raises(WeightsError, match=r'wrong shapes \(1\): output_conv1\.weight \(1, 64, 1, 1\)'):
        load_reference_checkpoint(DS2Net('pvt_v2_b2'), tmp_path / 'shape.pth')


# The authors' checkpoint layout, written out from their key names (DS2Net's section 3 layout: i = 1…3, j = 0…3,
# n = 1…6) with the ds2net parameter each must land in. It is independent of the mapping code: each rule is checked
# on its own, so two rules swapped in the library (say DEM conv1 and conv2) fail here by name.
def _authors_layout()->dict:
    "{rule: {authors' key: ds2net key}}"
    bn = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
    rules = {
        'Translayer1_j.conv.0 → translation.j.0 (1×1 conv)':
            {f'Translayer1_{j}.conv.0.weight': f'translation.{j}.0.weight' for j in range(4)},
        'Translayer1_j.conv.1 → translation.j.1 (BatchNorm)':
            {f'Translayer1_{j}.conv.1.{b}': f'translation.{j}.1.{b}' for j in range(4) for b in bn},
        'DEMi.conv_pool.0 → detail_path.i-1.fuse.0 (1×1 conv)':
            {f'DEM{i}.conv_pool.0.{b}': f'detail_path.{i - 1}.fuse.0.{b}' for i in (1, 2, 3) for b in ('weight', 'bias')},
        'DEMi.conv_pool.2 → detail_path.i-1.fuse.2 (3×3 conv)':
            {f'DEM{i}.conv_pool.2.{b}': f'detail_path.{i - 1}.fuse.2.{b}' for i in (1, 2, 3) for b in ('weight', 'bias')},
        'DEMi.conv1 → detail_conv_a (first k×k conv)': {f'DEM{i}.conv1.weight': f'detail_path.{i - 1}.detail_conv_a.weight' for i in (1, 2, 3)},
        'DEMi.conv2 → detail_conv_b (second k×k conv)': {f'DEM{i}.conv2.weight': f'detail_path.{i - 1}.detail_conv_b.weight' for i in (1, 2, 3)},
        'SEMi.sa.conv1 → spatial_conv (7×7)': {f'SEM{i}.sa.conv1.weight': f'semantic_path.{i - 1}.spatial_conv.weight' for i in (1, 2, 3)},
        'SEMi.ca.fc1 → channel_mlp.0': {f'SEM{i}.ca.fc1.weight': f'semantic_path.{i - 1}.channel_mlp.0.weight' for i in (1, 2, 3)},
        'SEMi.ca.fc2 → channel_mlp.2': {f'SEM{i}.ca.fc2.weight': f'semantic_path.{i - 1}.channel_mlp.2.weight' for i in (1, 2, 3)},
        'SEMi.conv1 → mask_conv (3×3)':
            {f'SEM{i}.conv1.{b}': f'semantic_path.{i - 1}.mask_conv.{b}' for i in (1, 2, 3) for b in ('weight', 'bias')},
        'output_convn → heads.n-1 (d1, d2, d3, s1, s2, s3)':
            {f'output_conv{n}.{b}': f'heads.{n - 1}.{b}' for n in range(1, 7) for b in ('weight', 'bias')},
        # the encoder: original PVTv2 names under backbone1., a few of each kind
        'backbone1 (original PVTv2 names) → encoder': {
            'backbone1.patch_embed1.proj.weight': 'encoder.patch_embed.proj.weight',
            'backbone1.patch_embed1.norm.bias': 'encoder.patch_embed.norm.bias',
            'backbone1.patch_embed3.proj.weight': 'encoder.stages_2.downsample.proj.weight',
            'backbone1.block1.0.attn.q.weight': 'encoder.stages_0.blocks.0.attn.q.weight',
            'backbone1.block2.1.attn.sr.weight': 'encoder.stages_1.blocks.1.attn.sr.weight',
            'backbone1.block4.1.mlp.dwconv.dwconv.weight': 'encoder.stages_3.blocks.1.mlp.dwconv.weight',
            'backbone1.norm4.weight': 'encoder.stages_3.norm.weight',
        },
    }
    return rules


AUTHORS_LAYOUT = _authors_layout()


@pytest.fixture(scope='module')
def small_pvt():
    torch.manual_seed(1)
    return DS2Net('pvt_v2_b0', channels=32).eval()


def test_authors_layout_covers_every_decoder_parameter(small_pvt):
    ours = {v for rule in AUTHORS_LAYOUT.values() for v in rule.values()}
    decoder = {k for k in small_pvt.state_dict() if not k.startswith('encoder.')}
    assert decoder <= ours, sorted(decoder - ours)  # the layout above names every decoder tensor
    assert len([k for k in ours if not k.startswith('encoder.')]) == len(decoder) == 69  # 24 translation, 18 DEM, 15 SEM, 12 heads


@pytest.mark.parametrize('rule', list(AUTHORS_LAYOUT))
def test_reference_state_dict_rule_by_rule(small_pvt, rule):
    "Saving in the authors' layout puts each ds2net tensor under the authors' key of the fixture."
    ref, ours = reference_state_dict(small_pvt), small_pvt.state_dict()
    for authors_key, our_key in AUTHORS_LAYOUT[rule].items():
        assert authors_key in ref, f'{rule}: {authors_key} missing from the authors layout'
        assert torch.equal(ref[authors_key], ours[our_key]), f'{rule}: {authors_key} does not hold {our_key}'


def test_loading_a_state_dict_built_by_hand_in_the_authors_naming(small_pvt, tmp_path):
    "Every tensor of the hand-built file lands in the parameter the fixture names (distinct values, so a swap shows)."
    torch.manual_seed(7)
    ours = small_pvt.state_dict()
    sd = {}
    for rule in AUTHORS_LAYOUT.values():
        for authors_key, our_key in rule.items():
            t = ours[our_key]
            sd[authors_key] = (t + torch.randn_like(t.float()).to(t.dtype)) if t.is_floating_point() else t + 3
    # the rest of the encoder (not named in the fixture) in the original naming, as the authors' file holds it
    for k, v in reference_state_dict(small_pvt).items():
        if k.startswith('backbone1.') and k not in sd: sd[k] = v.clone()
    torch.save(sd, tmp_path / 'authors.pth')
    loaded = load_reference_checkpoint(DS2Net('pvt_v2_b0', channels=32), tmp_path / 'authors.pth').state_dict()
    for rule, pairs in AUTHORS_LAYOUT.items():
        for authors_key, our_key in pairs.items():
            assert torch.equal(loaded[our_key], sd[authors_key]), f'{rule}: {authors_key} did not land in {our_key}'


class NotWeights:
    "An arbitrary Python object: a weights_only load must refuse to unpickle it."


def test_reference_checkpoint_refuses_pickled_objects(tmp_path):
    torch.save({'x': NotWeights()}, tmp_path / 'evil.pth')
    with pytest.raises(WeightsError, match='weights_only=True'):
        load_reference_checkpoint(DS2Net(TINY_ENCODER), tmp_path / 'evil.pth')
    with pytest.raises(WeightsError, match='not found'):
        load_reference_checkpoint(DS2Net(TINY_ENCODER), tmp_path / 'nope.pth')


def _original_pvt_checkpoint(name, seed=0):
    "A classification PVTv2 state dict in the original release's key names (patch_embed1, block1.0, norm1, head)."
    torch.manual_seed(seed)
    full = timm.create_model(name, pretrained=False)
    sd = {_original_pvt_name(k): v.clone() for k, v in full.state_dict().items()}
    return full, sd


def test_encoder_weights_in_original_pvt_naming(tmp_path):
    full, sd = _original_pvt_checkpoint('pvt_v2_b0')
    assert 'patch_embed1.proj.weight' in sd and 'block1.0.mlp.dwconv.dwconv.weight' in sd and 'norm4.weight' in sd
    assert 'head.weight' in sd
    path = tmp_path / 'pvt_v2_b0.pth'
    torch.save(sd, path)
    model = DS2Net('pvt_v2_b0', encoder_weights=path)
    full_sd = full.state_dict()
    for k, v in model.encoder.state_dict().items():
        head, _, rest = k.partition('.')
        full_key = re.sub(r'_(\d+)$', r'.\1', head) + '.' + rest
        torch.testing.assert_close(v, full_sd[full_key], msg=k)
    # the same weights in timm's own naming load too
    torch.save(full.state_dict(), tmp_path / 'timm.pth')
    model2 = DS2Net('pvt_v2_b0', encoder_weights=tmp_path / 'timm.pth')
    for (k, a), b in zip(model.encoder.state_dict().items(), model2.encoder.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_encoder_weights_refuse_partial_files(tmp_path):
    _, sd = _original_pvt_checkpoint('pvt_v2_b0')
    del sd['block2.1.attn.q.weight']
    torch.save(sd, tmp_path / 'partial.pth')
    with pytest.raises(WeightsError, match=r'missing keys \(1\): stages_1\.blocks\.1\.attn\.q\.weight'):
        DS2Net('pvt_v2_b0', encoder_weights=tmp_path / 'partial.pth')
    _, sd = _original_pvt_checkpoint('pvt_v2_b0')
    torch.save(sd, tmp_path / 'b0.pth')
    with pytest.raises(WeightsError, match='wrong shapes'):
        DS2Net('pvt_v2_b1', encoder_weights=tmp_path / 'b0.pth')


def test_pretrained_without_network_says_what_to_do(tmp_path):
    code = "from ds2net.model import DS2Net; DS2Net('resnet18', pretrained=True)"
    # offline, and every cache pointed at an empty folder: a copy cached on a user's machine cannot make this pass
    cache = tmp_path / 'empty-cache'; cache.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HOME=str(cache / 'hf'), HF_HUB_CACHE=str(cache / 'hf' / 'hub'),
               HUGGINGFACE_HUB_CACHE=str(cache / 'hf' / 'hub'), TORCH_HOME=str(cache / 'torch'), XDG_CACHE_HOME=str(cache))
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0
    assert "Could not get ImageNet weights for encoder 'resnet18'" in r.stderr
    assert 'encoder_weights=PATH' in r.stderr


@pytest.mark.parametrize('encoder', ['resnet18', 'efficientnet_b0', 'convnext_atto', 'pvt_v2_b0'])
def test_other_timm_encoders(encoder):
    model = DS2Net(encoder, channels=16).eval()
    with torch.no_grad(): outs = model(torch.randn(1, 3, 96, 80))
    assert [o.shape for o in outs] == [torch.Size([1, 1, 96, 80])] * 6
    assert model.config == dict(encoder=encoder, channels=16, in_chans=3, drop_path_rate=0.1 if encoder.startswith('pvt_v2') else 0.0)


def test_unknown_encoder():
    with pytest.raises(ValueError, match="Unknown timm encoder 'resnet_nope'"): DS2Net('resnet_nope')


def test_drop_path_rate_default_config_and_eval_outputs(paper, tmp_path):
    "The paper's stochastic depth is on for PVTv2 (0.1, rising over the 16 blocks), stored in the config, and changes no eval output."
    assert paper.drop_path_rate == 0.1 and paper.config['drop_path_rate'] == 0.1
    rates = [m.drop_prob for m in paper.modules() if isinstance(m, DropPath)]
    # 0, 0.1/15, ..., 0.1 over the 16 blocks (two per block: attention and MLP); timm leaves out the first block's 0
    assert len(rates) == 2 * 15 and abs(min(rates) - 0.1 / 15) < 1e-6 and abs(max(rates) - 0.1) < 1e-6
    assert DS2Net(TINY_ENCODER).drop_path_rate == 0 and DS2Net(TINY_ENCODER, drop_path_rate=0.05).config['drop_path_rate'] == 0.05
    # eval outputs are those of the same weights without stochastic depth, exactly, and still the reference mapping's
    plain = DS2Net('pvt_v2_b2', drop_path_rate=0).eval()
    plain.load_state_dict(paper.state_dict())
    path = tmp_path / 'ref.pth'
    torch.save(reference_state_dict(paper), path)
    from_ref = load_reference_checkpoint(DS2Net('pvt_v2_b2'), path).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        for a, b, c in zip(paper(x), plain(x), from_ref(x)):
            assert torch.equal(a, b) and torch.equal(a, c)
    # in training it does act: two forward passes of the same batch differ
    torch.manual_seed(0)
    paper.train()
    try:
        with torch.no_grad(): assert not torch.equal(paper(x)[0], paper(x)[0])
    finally: paper.eval()


def test_checkpoint_without_drop_path_rate_still_loads(tmp_path):
    from ds2net.callbacks import save_checkpoint, model_from_checkpoint
    model = DS2Net(TINY_ENCODER, channels=8)
    save_checkpoint(tmp_path / 'new.pth', model, dict(size=64))
    old = torch.load(tmp_path / 'new.pth', weights_only=True)
    assert old['config']['drop_path_rate'] == 0.0
    del old['config']['drop_path_rate']  # as written before the key existed
    torch.save(old, tmp_path / 'old.pth')
    loaded, cfg = model_from_checkpoint(tmp_path / 'old.pth')
    assert 'drop_path_rate' not in cfg and loaded.drop_path_rate == 0.0
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
