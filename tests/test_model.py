"DS2Net model: sizes, shapes, gradients, the blocks in place, other encoders (the paper's section 2)."
import os, subprocess, sys
import pytest, torch
import torch.nn.functional as F
from ds2net.blocks import DEM, SEM
from timm.layers import DropPath
from ds2net.model import DS2Net, TINY_ENCODER, SIDE_OUTPUT_NAMES, count_parameters, count_flops
from ds2net.weights import load_reference_checkpoint, reference_state_dict


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


def test_fuse_side_outputs_takes_a_tuple_or_a_tensor():
    from ds2net.model import fuse_side_outputs
    x = torch.randn(2, 1, 4, 4)
    assert fuse_side_outputs(x) is x
    torch.testing.assert_close(fuse_side_outputs((x, 2 * x, -x)), 2 * x)
    torch.testing.assert_close(fuse_side_outputs([x]), x)


@pytest.mark.parametrize('kwargs, message', [
    (dict(channels=0), "channels=0: the decoder's width must be a whole number of at least 1 (the paper's is 32)"),
    (dict(channels=16.5), "channels=16.5: the decoder's width must be a whole number of at least 1 (the paper's is 32)"),
    (dict(in_chans=0), "in_chans=0: the images' channels must be a whole number of at least 1 (3 for RGB)"),
    (dict(drop_path_rate=1.0), "drop_path_rate=1.0: the stochastic depth is a probability in [0, 1) (or None for the default)"),
    (dict(drop_path_rate=float('nan')), "drop_path_rate=nan: the stochastic depth is a probability in [0, 1) (or None for "
                                        "the default)"),
])
def test_sizes_that_cannot_build_a_network_are_refused(kwargs, message):
    "Issue 16, item 16: DS2Net(channels=0) used to build (and fail at the first forward pass)."
    with pytest.raises(ValueError) as e: DS2Net(TINY_ENCODER, **kwargs)
    assert str(e.value) == message
