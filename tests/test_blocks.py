"""DEM and SEM in detail, beyond the formula checks of test_model: their sizes, their errors, their printout and what
the SEM's dropout does in training. Fast: mutmut runs these against every mutant of ds2net/blocks.py."""
import pytest, torch
import torch.nn.functional as F
from torch import nn
from ds2net.blocks import DEM, SEM, upsample_like


def test_upsample_like_matches_the_low_maps_size_with_aligned_corners():
    high, low = torch.arange(4.).view(1, 1, 2, 2), torch.zeros(1, 5, 3, 5)
    up = upsample_like(high, low)
    assert up.shape == (1, 1, 3, 5)
    # align_corners=True keeps the corner values exactly: 0, 1, 2, 3 at the four corners
    assert up[0, 0, 0, 0] == 0 and up[0, 0, 0, -1] == 1 and up[0, 0, -1, 0] == 2 and up[0, 0, -1, -1] == 3
    torch.testing.assert_close(up, F.interpolate(high, size=(3, 5), mode='bilinear', align_corners=True))
    assert not torch.allclose(up, F.interpolate(high, size=(3, 5), mode='bilinear', align_corners=False))


@pytest.mark.parametrize('k', [3, 5, 7])
def test_dem_layers_and_sizes(k):
    dem = DEM(8, kernel_size=k)
    assert (dem.channels, dem.kernel_size, dem.residual) == (8, k, True)
    conv1, relu, conv3 = dem.fuse
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size, conv1.bias is not None) == (16, 8, (1, 1), True)
    assert isinstance(relu, nn.ReLU)
    assert (conv3.in_channels, conv3.out_channels, conv3.kernel_size, conv3.padding, conv3.bias is not None) == (8, 8, (3, 3), (1, 1), True)
    for conv in (dem.detail_conv_a, dem.detail_conv_b):
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding, conv.bias) == (1, 1, (k, k), (k // 2, k // 2), None)
    out, mask = dem(torch.randn(2, 8, 5, 6), torch.randn(2, 8, 10, 12), return_mask=True)
    assert out.shape == (2, 8, 10, 12) and mask.shape == (2, 1, 10, 12)
    assert torch.is_tensor(dem(torch.randn(1, 8, 5, 6), torch.randn(1, 8, 10, 12)))  # the map alone without return_mask
    assert dem.extra_repr() == f'channels=8, kernel_size={k}, residual=True' and dem.extra_repr() in repr(dem)


def test_dem_refuses_an_even_kernel():
    with pytest.raises(ValueError, match=r"^DEM kernel_size must be odd to keep the map's size, got 4$"): DEM(8, kernel_size=4)


def test_dem_mask_reads_the_strongest_channel_of_low_only():
    torch.manual_seed(0)
    dem = DEM(4, kernel_size=3)
    low = torch.randn(1, 4, 6, 6)
    other = low.clone(); other[:, 1:] = low[:, :1] - 5  # every other channel below channel 0: the channel max is channel 0
    torch.testing.assert_close(dem.detail_mask(other), dem.detail_mask(low[:, :1].expand(1, 4, 6, 6).clone()))
    # and not on `high`: two different high maps, the same mask
    _, m1 = dem(torch.randn(1, 4, 3, 3), low, return_mask=True)
    _, m2 = dem(torch.randn(1, 4, 3, 3), low, return_mask=True)
    torch.testing.assert_close(m1, m2)


def test_dem_puts_the_upsampled_map_first_in_the_concatenation():
    torch.manual_seed(1)
    dem = DEM(2, kernel_size=3, residual=False)
    with torch.no_grad():
        dem.fuse[0].weight.zero_(); dem.fuse[0].bias.zero_()
        dem.fuse[0].weight[:, :2] = torch.eye(2).view(2, 2, 1, 1)  # pass the first two channels (the upsampled map) only
        dem.fuse[2].weight.zero_(); dem.fuse[2].bias.zero_()
        dem.fuse[2].weight[:, :, 1, 1] = torch.eye(2)              # identity 3×3
    high, low = torch.rand(1, 2, 4, 4), torch.rand(1, 2, 8, 8)
    out, mask = dem(high, low, return_mask=True)
    torch.testing.assert_close(out, upsample_like(high, low) * mask)


@pytest.mark.parametrize('channels,reduction,hidden', [(32, 16, 2), (64, 16, 4), (8, 16, 1), (32, 8, 4)])
def test_sem_layers_and_sizes(channels, reduction, hidden):
    sem = SEM(channels, reduction=reduction)
    assert (sem.channels, sem.reduction) == (channels, reduction)
    sc = sem.spatial_conv
    assert (sc.in_channels, sc.out_channels, sc.kernel_size, sc.padding, sc.bias) == (2, 1, (7, 7), (3, 3), None)
    mc = sem.mask_conv
    assert (mc.in_channels, mc.out_channels, mc.kernel_size, mc.padding, mc.bias is not None) == (1, 1, (3, 3), (1, 1), True)
    fc1, relu, fc2 = sem.channel_mlp
    assert (fc1.in_channels, fc1.out_channels, fc1.bias, fc2.in_channels, fc2.out_channels, fc2.bias) == (channels, hidden, None, hidden, channels, None)
    assert isinstance(relu, nn.ReLU) and sem.spatial_dropout.p == 0.5
    out, mask = sem(torch.randn(2, channels, 4, 5), torch.randn(2, channels, 8, 10), return_mask=True)
    assert out.shape == (2, channels, 8, 10) and mask.shape == (2, 1, 8, 10)
    assert torch.is_tensor(sem.eval()(torch.randn(1, channels, 4, 5), torch.randn(1, channels, 8, 10)))
    assert sem.extra_repr() == f'channels={channels}, reduction={reduction}' and sem.extra_repr() in repr(sem)
    assert SEM(channels, dropout=0.25).spatial_dropout.p == 0.25


def test_sem_channel_weights_use_average_and_max_pooling():
    torch.manual_seed(2)
    sem = SEM(16)
    x = torch.randn(2, 16, 5, 5)
    mlp = sem.channel_mlp
    expected = torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
    w = sem.channel_weights(x)
    assert w.shape == (2, 16, 1, 1)
    torch.testing.assert_close(w, expected)


def test_sem_dropout_in_training_drops_or_doubles_the_attention_map():
    "Dropout2d on the one-channel map: in training each image's map is zeroed (mask = sigmoid(conv(0.5))) or doubled."
    torch.manual_seed(3)
    sem = SEM(8).train()
    up = torch.randn(64, 8, 6, 6)
    pooled = torch.cat([up.mean(1, keepdim=True), up.amax(1, keepdim=True)], 1)
    logits = sem.spatial_conv(pooled)
    dropped = torch.sigmoid(sem.mask_conv(torch.sigmoid(torch.zeros_like(logits))))
    doubled = torch.sigmoid(sem.mask_conv(torch.sigmoid(2 * logits)))
    mask = sem.semantic_mask(up)
    kinds = []
    for i in range(len(up)):
        if torch.allclose(mask[i], dropped[i]): kinds.append('dropped')
        elif torch.allclose(mask[i], doubled[i]): kinds.append('doubled')
        else: pytest.fail(f'image {i}: the mask is neither dropped nor doubled')
    assert 16 < kinds.count('dropped') < 48  # about half of 64
    sem.eval()
    torch.testing.assert_close(sem.semantic_mask(up), torch.sigmoid(sem.mask_conv(torch.sigmoid(logits))))


def test_defaults_are_the_papers_configuration():
    "C = 32 channels, DEM k = 3 with the residual, SEM reduction 16 (hidden width 2) and dropout 0.5; ReLUs in place, as the authors'."
    dem, sem = DEM(), SEM()
    assert (dem.channels, dem.kernel_size, dem.residual) == (32, 3, True)
    assert (sem.channels, sem.reduction, sem.channel_mlp[0].out_channels, sem.spatial_dropout.p) == (32, 16, 2, 0.5)
    assert dem.fuse[1].inplace and sem.channel_mlp[1].inplace  # in place: no extra activation memory, same values
