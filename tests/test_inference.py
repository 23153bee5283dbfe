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


# ---------------------------------------------------------------- issue 16: links, inputs, complete pairs (items 3, 15)
from pathlib import Path

import ds2net.inference as inference
from ds2net.checkpoint import save_checkpoint
from ds2net.cli import main
from ds2net.data import write_synthetic
from ds2net.model import DS2Net, TINY_ENCODER
from support import tree


@pytest.fixture(scope='module')
def tiny_model(tmp_path_factory):
    "An untrained tiny DS2Net saved as a ds2net checkpoint (64 px): fast to load, enough to write masks."
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('model') / 'm.pth'
    return save_checkpoint(path, DS2Net(TINY_ENCODER, channels=8), dict(size=64, mean=[0.485, 0.456, 0.406],
                                                                        std=[0.229, 0.224, 0.225]))


@pytest.fixture
def d16(tmp_path):
    "`ds2net synth --kind polyp --n 16 --size 64 --out d16`."
    return write_synthetic('polyp', tmp_path / 'd16', n=16, size=64)


def predict(model, inp, out, *extra):
    return main(['predict', '--model', str(model), '--input', str(inp), '--out', str(out), '--device', 'cpu', *extra])


def test_predict_into_a_link_to_a_masks_folder_is_refused(tiny_model, d16, tmp_path, capsys):
    link = tmp_path / 'LINK'; link.symlink_to(d16 / 'masks')
    before = tree(d16)
    assert predict(tiny_model, d16 / 'images', d16 / 'masks') == 1  # the masks folder itself, with or without --overwrite
    assert f"error: --out {d16 / 'masks'} is the masks folder of a data set" in capsys.readouterr().err
    assert predict(tiny_model, d16 / 'images', link, '--overwrite') == 1
    assert capsys.readouterr().err == (
        f"ds2net predict: error: --out {link} (a link to {d16 / 'masks'}) is the masks folder of a data set (its images are "
        f"in {d16 / 'images'}): predictions never go there, not even with --overwrite, since they would replace the ground "
        f"truth; choose another folder, e.g. {d16 / 'predictions'}\n")
    assert tree(d16) == before


def test_predict_never_writes_through_a_link_to_a_file(tiny_model, d16, tmp_path, capsys):
    out = tmp_path / 'pred'; out.mkdir()
    (out / 'polyp_00003.png').symlink_to(d16 / 'masks' / 'polyp_00003.png')
    before = tree(d16)
    assert predict(tiny_model, d16 / 'images', out, '--overwrite') == 1
    assert capsys.readouterr().err == (
        f"ds2net predict: error: --out {out} holds symbolic links of the names to write (polyp_00003.png): ds2net never "
        f"writes through a link, not even with --overwrite; remove them or choose another --out\n")
    assert tree(d16) == before and [p.name for p in out.iterdir()] == ['polyp_00003.png']
    with pytest.raises(ParameterError) as e: check_predict_out(input_files(d16 / 'images'), out, overwrite=True)
    assert e.value.param == 'out' and 'holds symbolic links of the names to write (polyp_00003.png)' in str(e.value)


def test_predict_keeps_outputs_and_inputs_apart(tiny_model, d16, capsys):
    before = tree(d16)
    assert predict(tiny_model, d16 / 'images', d16) == 1  # the output would hold the input
    assert capsys.readouterr().err == (
        f"ds2net predict: error: --out {d16} contains --input {d16 / 'images'}, an input of this command: ds2net keeps its "
        f"outputs and inputs apart; choose another --out\n")
    assert predict(tiny_model, d16 / 'images', d16 / 'images' / 'pred') == 1
    assert capsys.readouterr().err == (
        f"ds2net predict: error: --out {d16 / 'images' / 'pred'} is inside --input {d16 / 'images'}, an input of this "
        f"command: ds2net never writes into its inputs; choose another --out\n")
    assert tree(d16) == before


def ctrl_c_at_write(monkeypatch, k):
    "Ctrl-C during the k-th file write of `predict_files` (1-based); returns the names it was asked to write."
    real, calls = inference.atomic_write, []
    def write(path, content):
        calls.append(Path(path).name)
        if len(calls) == k: raise KeyboardInterrupt
        return real(path, content)
    monkeypatch.setattr(inference, 'atomic_write', write)
    return calls


def test_ctrl_c_leaves_complete_pairs_and_says_how_to_finish(tiny_model, d16, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'pred'
    calls = ctrl_c_at_write(monkeypatch, 6)  # the third image's mask, after its overlay
    assert predict(tiny_model, d16 / 'images', out, '--overlay') == 130
    assert calls[-2:] == ['polyp_00002_overlay.png', 'polyp_00002.png']
    assert capsys.readouterr().err == (
        f"ds2net: Prediction interrupted: 2 of 16 images were predicted and their masks and overlays written to --out {out}, "
        f"each complete; the other 14 were not written; to finish the folder, run the same command again with --overwrite "
        f"(it replaces the 2 written)\n")
    assert sorted(p.name for p in out.iterdir()) == ['polyp_00000.png', 'polyp_00000_overlay.png', 'polyp_00001.png',
                                                     'polyp_00001_overlay.png']  # no mask without its overlay, no temp
    with pytest.raises(KeyboardInterrupt) as e:  # the same in Python words
        ctrl_c_at_write(monkeypatch, 1); predict_files(tiny_model, d16 / 'images', tmp_path / 'p2', device='cpu')
    assert str(e.value) == (f"Prediction interrupted: no file was written to out='{tmp_path / 'p2'}'; run the same command "
                            f"again") and isinstance(e.value, inference.PredictionInterrupted) and not (tmp_path / 'p2').exists()
    monkeypatch.undo()
    assert predict(tiny_model, d16 / 'images', out, '--overlay', '--overwrite') == 0  # what the message says finishes it
    assert len(list(out.iterdir())) == 32


def test_a_bad_image_stops_with_what_was_written(tiny_model, d16, tmp_path, capsys):
    bad = d16 / 'images' / 'polyp_00003.png'; bad.write_bytes(b'not a png')
    out = tmp_path / 'pred'
    assert predict(tiny_model, d16 / 'images', out, '--overlay') == 1
    assert capsys.readouterr().err == (
        f"ds2net predict: error: {bad}: cannot read this image (UnidentifiedImageError: cannot identify image file "
        f"'{bad}'); the file is truncated or not an image: replace it with a good copy or move it out of the data set. "
        f"Prediction stopped at that image: 3 of 16 images were predicted and their masks and overlays written to --out "
        f"{out}, each complete; the other 13 were not written; once that image is fixed or moved out, run the same command "
        f"again with --overwrite (it replaces the 3 written) to finish the folder\n")
    assert sorted(p.name for p in out.iterdir()) == sorted(f'polyp_0000{i}{s}.png' for i in range(3) for s in ('', '_overlay'))
    with pytest.raises(ParameterError) as e: predict_files(tiny_model, d16 / 'images', tmp_path / 'p2', bs=2)
    assert e.value.param == 'inp' and '3 of 16 images were predicted and their masks written to' in str(e.value)
    with pytest.raises(ParameterError, match=r"^bs=0: give the number of images per forward pass, a whole number of at least 1$"):
        predict_files(tiny_model, d16 / 'images', tmp_path / 'p3', bs=0)
