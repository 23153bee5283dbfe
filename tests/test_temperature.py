"Issue 19 in use: the temperature fitted at the end of training and applied on request, test-time augmentation in predict, and `evaluate --calibration`."
import numpy as np
import pytest
import torch
from PIL import Image

from ds2net.cli import main
from ds2net.checkpoint import model_from_checkpoint, read_checkpoint
from ds2net.calibration import side_logits_at, validation_pairs
from ds2net.data import make_synthetic, segmentation_dls
from ds2net.errors import ParameterError
from ds2net.evaluate import CALIBRATION_COLUMNS, evaluate_checkpoint, load_test_sets, read_prediction
from ds2net.inference import predict_files, predict_probabilities, prepare_images
from ds2net.metrics import METRIC_NAMES
from ds2net.uncertainty import FLIPS, Flip, tta_probabilities
from support import EASY


def _nll(logits, masks, t):
    "Mean binary cross-entropy of sigmoid(z / t) over all pixels, in float64 numpy (an independent computation)."
    z = np.concatenate([l.ravel() for l in logits]).astype(np.float64) / t
    y = np.concatenate([m.ravel() for m in masks]).astype(np.float64)
    return float(np.mean(np.logaddexp(0, z) - y * z))  # -y log σ(z) - (1 - y) log(1 - σ(z))


def _validation(run):
    "The validation images, masks and fused logits of `trained_run` (the split `train(..., **EASY)` made: seed 42, 20%)."
    model, config = model_from_checkpoint(run / 'best.pth')
    dls = segmentation_dls('synthetic:polyp', size=EASY['size'], bs=EASY['bs'], seed=42, n=EASY['n_synthetic'],
                           valid_pct=0.2, difficulty=EASY['difficulty'], device='cpu')
    pairs = list(validation_pairs(dls))
    logits = [l.sum(0).numpy() for l in side_logits_at(model, [i for i, _ in pairs], config)]
    return model, config, pairs, logits


def test_training_stores_the_temperature_that_minimises_validation_nll(trained_run):
    run, summary = trained_run
    t = read_checkpoint(run / 'best.pth')['config']['temperature']
    assert isinstance(t, float) and t > 0 and summary['temperature'] == t
    assert 'temperature' not in read_checkpoint(run / 'last.pth')['config']  # the resume file is left as training wrote it
    model, config, pairs, logits = _validation(run)
    masks = [m > 0 for _, m in pairs]
    best = _nll(logits, masks, t)
    for other in (1.0, t * 1.05, t / 1.05): assert best <= _nll(logits, masks, other) + 1e-7, other
    # dividing logits by T > 0 keeps their signs: the mask at 0.5, and so the Dice, do not move
    images = [i for i, _ in pairs]
    raw, calibrated = predict_probabilities(model, images, config), predict_probabilities(model, images, config, temperature=t)
    for a, b in zip(raw, calibrated): np.testing.assert_array_equal(a > 0.5, b > 0.5)


def _image(tmp_path, size=(70, 90), seed=0):
    inp = tmp_path / 'in'; inp.mkdir(exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(inp / 'a.png')
    return inp


def test_predict_calibrated_writes_the_tempered_probability(trained_run, tmp_path, capsys):
    run, _ = trained_run
    t = read_checkpoint(run / 'best.pth')['config']['temperature']
    inp = _image(tmp_path)
    assert main(['predict', '--model', str(run / 'best.pth'), '--input', str(inp), '--out', str(tmp_path / 'raw')]) == 0
    assert main(['predict', '--model', str(run / 'best.pth'), '--input', str(inp), '--out', str(tmp_path / 'cal'),
                 '--calibrated']) == 0
    p = np.clip(read_prediction(tmp_path / 'raw' / 'a.png').astype(np.float64), 1e-4, 1 - 1e-4)
    expected = 1 / (1 + np.exp(-np.log(p / (1 - p)) / t))  # the raw PNG's logit, divided by T
    got = read_prediction(tmp_path / 'cal' / 'a.png')
    assert np.abs(got - expected)[(p > 0.01) & (p < 0.99)].max() <= 2 / 255  # two PNG roundings apart at most
    capsys.readouterr()
    last = run / 'last.pth'
    assert main(['predict', '--model', str(last), '--input', str(inp), '--out', str(tmp_path / 'no'), '--calibrated']) == 1
    assert capsys.readouterr().err == (f"ds2net predict: error: {last} stores no fitted temperature: `ds2net train` fits one on "
                                       "the validation split at the end of training and stores it in best.pth; predict "
                                       "without --calibrated\n")
    assert not (tmp_path / 'no').exists()


def test_predict_tta_averages_the_flips_brought_back(trained_run, tmp_path, capsys):
    run, _ = trained_run
    model, config = model_from_checkpoint(run / 'best.pth')
    images = list(make_synthetic('polyp', 3, size=64, seed=5, difficulty=0.5)[0])  # at the network's size: no resizing
    x = prepare_images(images, config['size'], config['mean'], config['std'])
    expected = tta_probabilities(model.eval(), x, FLIPS).mean(0)[:, 0].numpy()
    got = predict_probabilities(model, images, config, bs=2, transforms=FLIPS)
    np.testing.assert_allclose(np.stack(got), expected, atol=1e-5)
    plain = predict_probabilities(model, images, config)
    assert all(np.array_equal(a, b) for a, b in zip(predict_probabilities(model, images, config, transforms=(Flip(),)), plain))
    assert max(np.abs(a - b).max() for a, b in zip(got, plain)) > 1e-4  # the flips do change the network's answer
    inp = tmp_path / 'in'; inp.mkdir()
    Image.fromarray(images[0]).save(inp / 'a.png')
    assert main(['predict', '--model', str(run / 'best.pth'), '--input', str(inp), '--out', str(tmp_path / 'tta'), '--tta']) == 0
    one = np.asarray(Image.open(inp / 'a.png').convert('RGB'))
    np.testing.assert_allclose(read_prediction(tmp_path / 'tta' / 'a.png'),
                               predict_probabilities(model, [one], config, transforms=FLIPS)[0], atol=0.5 / 255 + 1e-6)
    capsys.readouterr()
    onnx = tmp_path / 'm.onnx'
    assert main(['predict', '--model', str(onnx), '--input', str(inp), '--out', str(tmp_path / 'o'), '--tta']) == 1
    assert capsys.readouterr().err == ("ds2net predict: error: test-time augmentation runs the network in PyTorch: give the "
                                       f"checkpoint or the pretrained folder, not the .onnx export {onnx}\n")
    assert not (tmp_path / 'o').exists()


def _ece_brier_nll(probs, masks, n_bins=15):
    "Equal-width ECE, Brier score and (clipped) NLL of probabilities against masks, in numpy."
    p = np.concatenate([q.ravel() for q in probs]).astype(np.float64)
    y = np.concatenate([m.ravel() for m in masks]).astype(np.float64)
    bins = np.floor(p * n_bins).astype(int)  # [k/n, (k+1)/n) -> k; p = 1 in a bin of its own
    ece = sum(abs(y[bins == b].sum() - p[bins == b].sum()) for b in range(n_bins + 1)) / len(p)
    q = np.clip(p, 1e-7, 1 - 1e-7)
    return ece, float(np.mean((p - y) ** 2)), float(np.mean(-y * np.log(q) - (1 - y) * np.log(1 - q)))


def test_evaluate_calibration_adds_columns_after_the_13(trained_run, tmp_path, capsys):
    from ds2net.calibration import N_BINS
    run, _ = trained_run
    ckpt = run / 'best.pth'
    t = read_checkpoint(ckpt)['config']['temperature']
    plain = evaluate_checkpoint(ckpt, 'synthetic:polyp', n_synthetic=6)
    table = evaluate_checkpoint(ckpt, 'synthetic:polyp', n_synthetic=6, calibration=True, csv=tmp_path / 'm.csv')
    assert list(table.columns) == [*METRIC_NAMES, 'n', *CALIBRATION_COLUMNS, 'temperature', *(f'{c}_T' for c in CALIBRATION_COLUMNS)]
    assert table[list(plain.columns)].equals(plain)  # the field's 13 (and n) exactly as without --calibration
    model, config = model_from_checkpoint(ckpt)
    (images, masks), = load_test_sets('synthetic:polyp', n_synthetic=6, size=config['size']).values()
    logits = [l.sum(0).numpy() for l in side_logits_at(model, images, config)]
    row = table.iloc[0]
    assert row['temperature'] == t
    for suffix, temp in (('', 1.0), ('_T', t)):
        ece, brier, _ = _ece_brier_nll(predict_probabilities(model, images, config, temperature=temp), masks, N_BINS)
        nll = _nll(logits, masks, temp)  # from the logits: a probability rounded to 1.0 in float32 has no finite log
        np.testing.assert_allclose([row[f'ECE_ew{suffix}'], row[f'Brier{suffix}'], row[f'NLL{suffix}']], [ece, brier, nll],
                                   rtol=1e-4, atol=1e-6)
        assert 0 <= row[f'ECE_em{suffix}'] <= 1
    assert (tmp_path / 'm.csv').read_text().splitlines()[0].endswith(',NLL_T')
    with pytest.raises(ParameterError) as e: evaluate_checkpoint(tmp_path / 'm.onnx', 'synthetic:polyp', calibration=True)
    assert str(e.value) == ("calibration=True measures the network's logits in PyTorch: give the checkpoint or the "
                            f"pretrained folder, not the .onnx export {tmp_path / 'm.onnx'}")
    capsys.readouterr()
    assert main(['evaluate', '--model', str(ckpt), '--data', 'synthetic:polyp', '--n-synthetic', '4', '--calibration']) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header[-9:] == [*CALIBRATION_COLUMNS, 'temperature', *(f'{c}_T' for c in CALIBRATION_COLUMNS)]
