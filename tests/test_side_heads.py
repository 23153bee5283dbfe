"""Side outputs for other networks: a fastai DynamicUnet trains with the deep-supervision loss."""
import pytest, torch

from ds2net.learner import ds2net_learner
from ds2net.side_heads import attach_side_heads


def test_dynamic_unet_side_heads(dls):
    import timm
    from torch import nn
    from fastai.vision.models.unet import DynamicUnet
    body = nn.Sequential(*list(timm.create_model('resnet18', pretrained=False).children())[:-2])
    net = attach_side_heads(DynamicUnet(body, n_out=1, img_size=(64, 64)))
    outs = net(torch.randn(2, 3, 64, 64))
    assert len(outs) == 5 and all(o.shape == (2, 1, 64, 64) for o in outs)
    assert net.levels == (4, 3, 2, 1, 0)
    learn = ds2net_learner(dls, model=net, weighting='exp', lr=1e-3)
    learn.fit(1)
    assert learn.loss_func.last_weights.tolist() == [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1]
    with pytest.raises(ValueError, match='no fastai UnetBlock'): attach_side_heads(nn.Conv2d(3, 1, 1))
