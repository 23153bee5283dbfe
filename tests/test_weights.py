"""Weights into DS2Net: the authors' checkpoint layout rule by rule (the fixture is written from their key names, not from
the mapping code), ImageNet files in the original PVTv2 or timm naming, and every refusal naming what differs."""
import re
import pytest, timm, torch
from ds2net.errors import WeightsError
from ds2net.model import DS2Net, TINY_ENCODER, SIDE_OUTPUT_NAMES
from ds2net.weights import load_encoder_weights, load_reference_checkpoint, reference_state_dict, _original_pvt_name


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


def test_encoder_weights_through_timm_exactly(tmp_path):
    "A local file goes through timm (`pretrained_cfg_overlay`); a file without the head loads, a file with an extra key does not."
    full, sd = _original_pvt_checkpoint('pvt_v2_b0')
    headless = {k: v for k, v in sd.items() if not k.startswith('head.')}
    torch.save(headless, tmp_path / 'headless.pth')
    model = DS2Net('pvt_v2_b0', encoder_weights=tmp_path / 'headless.pth')
    torch.testing.assert_close(model.encoder.state_dict()['stages_3.norm.weight'], full.state_dict()['stages.3.norm.weight'])
    torch.save({**sd, 'extra.weight': torch.zeros(1)}, tmp_path / 'extra.pth')
    with pytest.raises(WeightsError, match=r'unexpected keys \(1\): extra\.weight'):
        DS2Net('pvt_v2_b0', encoder_weights=tmp_path / 'extra.pth')
    (tmp_path / 'text.pth').write_text('not a weights file')
    with pytest.raises(WeightsError, match=r"Could not read .*text\.pth as ImageNet weights for encoder 'pvt_v2_b0'"):
        DS2Net('pvt_v2_b0', encoder_weights=tmp_path / 'text.pth')
    with pytest.raises(WeightsError, match='Encoder weights file not found'): DS2Net('pvt_v2_b0', encoder_weights=tmp_path / 'none.pth')
    loaded = load_encoder_weights(DS2Net('pvt_v2_b0'), tmp_path / 'headless.pth')  # into a model that exists
    for a, b in zip(loaded.encoder.state_dict().values(), model.encoder.state_dict().values()): assert torch.equal(a, b)
