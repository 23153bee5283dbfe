"""Inference from a checkpoint in Python: the network a checkpoint describes, inputs and outputs named in Python's words,
overlays in the figures' colours. (The predictions' values are pinned in test_pinned_behaviour.)"""
import numpy as np
import pytest, torch


from ds2net.errors import ParameterError, ParameterPathError
from ds2net.inference import (check_predict_out, input_files, model_from_checkpoint, output_names, overlay_image,
                              predict_files, resolve_device)
from ds2net.viz import PRED_COLOR
from support import write_png


def test_model_from_checkpoint_rebuilds_the_run(trained_run):
    out, _ = trained_run
    model, cfg = model_from_checkpoint(out / 'best.pth')
    assert not model.training and cfg['size'] == 64 and model.config['encoder'] == cfg['encoder'] == 'resnet10t'
    assert resolve_device('cpu') == torch.device('cpu')


def test_inputs_and_outputs_are_refused_in_python_words(trained_run, tmp_path):
    out, _ = trained_run
    with pytest.raises(ParameterPathError, match=rf"^inp='{tmp_path / 'none'}' does not exist: give an image file or a folder of images$") as e:
        predict_files(out / 'best.pth', tmp_path / 'none', tmp_path / 'pred')
    assert e.value.param == 'inp' and isinstance(e.value, FileNotFoundError)
    (tmp_path / 'empty').mkdir(); (tmp_path / 'empty' / '._hidden.png').write_bytes(b'')
    with pytest.raises(ParameterPathError, match=r"holds no images \(\.png, \.jpg, \.jpeg, \.tif, \.tiff, \.bmp\)$"):
        input_files(tmp_path / 'empty')
    (tmp_path / 'in').mkdir(); write_png(tmp_path / 'in' / 'a.png', np.zeros((40, 40, 3), np.uint8))
    files = input_files(tmp_path / 'in')
    (tmp_path / 'pred').mkdir(); (tmp_path / 'pred' / 'a.png').write_bytes(b'mine')
    with pytest.raises(ParameterError, match=r"already holds a\.png: ds2net never replaces a file unless asked; pass overwrite=True "
                                             r"to replace them, or choose another out$"):
        check_predict_out(files, tmp_path / 'pred')
    assert (tmp_path / 'pred' / 'a.png').read_bytes() == b'mine'
    with pytest.raises(ParameterError, match=r"^inp: x\.PNG, x\.png, x_png\.png would be written to the same output names .* different out folders$"):
        output_names([tmp_path / 'x.png', tmp_path / 'x_png.png', tmp_path / 'x.PNG'])


def test_overlay_marks_the_prediction_in_the_prediction_colour():
    image = np.full((40, 40, 3), 100, np.uint8)
    prob = np.zeros((40, 40)); prob[10:30, 10:30] = 0.9
    out = overlay_image(image, prob)
    rgb = np.array([int(PRED_COLOR[i:i + 2], 16) for i in (1, 3, 5)])
    assert (out[10, 10] == rgb).all()                                        # the outline
    np.testing.assert_allclose(out[20, 20], 0.55 * 100 + 0.45 * rgb, atol=1)  # the tint inside
    assert (out[0, 0] == 100).all() and (out[35, 35] == 100).all()           # the rest untouched
