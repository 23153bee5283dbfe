"""ds2net.export: ONNX export with onnxruntime parity, the errors for ONNX files that are not ds2net exports, and
`export_checkpoint` (ONNX and pretrained folders, the card of a run). Pretrained folders themselves: tests/test_hub.py.

Nothing is downloaded: every test runs with the hub switched off (HF_HUB_OFFLINE) and with outgoing connections
refused and recorded, and asserts at the end that none was tried. The paper's encoder (pvt_v2_b2, random weights) is
exported once per session (`pvt_export`; about 40 s on 2 cores), the tiny resnet10t once as well."""
import json, os, socket, time, warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import huggingface_hub.constants
from huggingface_hub import ModelCard

from ds2net import __version__
from ds2net.errors import ParameterError, WeightsError
from ds2net.model import DS2Net, SIDE_OUTPUT_NAMES
from ds2net.checkpoint import model_from_checkpoint, save_checkpoint
from ds2net.inference import predict_probabilities, prepare_images
from ds2net.hub import inference_config, CONFIG_NAME, CARD_NAME
from ds2net.export import (ExportError, OnnxModel, ONNX_SIDE_OUTPUTS, export_onnx, load_onnx, model_from_pretrained,
                           export_checkpoint, prepare_batch, resize_bilinear, training_record)

CONFIG = dict(size=96, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
BATCHES, SIZES = (1, 3), ((96, 96), (75, 110))   # (75, 110): neither square nor a multiple of 32
ATOL, RTOL = 1e-4, 1e-3
EXPORT_SECONDS = {}

@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    "The hub is off and any connection to another host is refused and recorded; the test fails if one was tried."
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    tried, connect = [], socket.socket.connect
    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ('127.0.0.1', 'localhost', '::1') and not host.startswith('/'):
            tried.append(address); raise OSError(f'network access refused in tests: {address}')
        return connect(self, address)
    monkeypatch.setattr(socket.socket, 'connect', guarded)
    yield
    assert not tried, f'the test tried to reach the network: {tried}'

def _export(encoder, path):
    torch.manual_seed(0)
    model = DS2Net(encoder, pretrained=False).eval()
    t = time.perf_counter()
    export_onnx(model, path, CONFIG)
    EXPORT_SECONDS[encoder] = time.perf_counter() - t
    return model, OnnxModel(path)

@pytest.fixture(scope='module')
def pvt_export(tmp_path_factory):
    "The paper's encoder with random weights, exported once (its export time is in EXPORT_SECONDS)."
    os.environ['HF_HUB_OFFLINE'] = '1'
    return _export('pvt_v2_b2', tmp_path_factory.mktemp('pvt')/'pvt.onnx')

@pytest.fixture(scope='module')
def tiny_export(tmp_path_factory):
    return _export('resnet10t', tmp_path_factory.mktemp('tiny')/'tiny.onnx')

@pytest.fixture(scope='module')
def exports(pvt_export, tiny_export): return {'pvt_v2_b2': pvt_export, 'resnet10t': tiny_export}

def _images(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]

# ------------------------------------------------------------------ ONNX: parity

@pytest.mark.parametrize('encoder', ['pvt_v2_b2', 'resnet10t'])
@pytest.mark.parametrize('bs', BATCHES)
@pytest.mark.parametrize('size', SIZES, ids=lambda s: f'{s[0]}x{s[1]}')
def test_onnxruntime_matches_pytorch(exports, encoder, bs, size):
    "onnxruntime on the CPU against PyTorch fp32: the probability and the fused logits, within atol 1e-4, rtol 1e-3."
    model, session = exports[encoder]
    x = torch.randn(bs, 3, *size, generator=torch.Generator().manual_seed(bs * size[1]))
    with torch.no_grad(): logits = sum(model(x))
    out = session.run(x.numpy())
    assert out['probability'].shape == (bs, 1, *size)
    np.testing.assert_allclose(out['probability'], torch.sigmoid(logits).numpy(), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(out['logits'], logits.numpy(), atol=ATOL, rtol=RTOL)
    print(f'{encoder} batch {bs} {size}: max |diff| {np.abs(out["probability"] - torch.sigmoid(logits).numpy()).max():.2e}')

def test_pvt_export_time_is_noted(pvt_export):
    "The session's one export of the paper's encoder: loosely bounded (about 40 s on 2 cores)."
    print(f"pvt_v2_b2 export: {EXPORT_SECONDS['pvt_v2_b2']:.1f} s")
    assert EXPORT_SECONDS['pvt_v2_b2'] < 600

@pytest.mark.parametrize('encoder', ['pvt_v2_b2', 'resnet10t'])
def test_predict_matches_predict_probabilities(exports, encoder):
    "OnnxModel.predict: one map per image at the image's own size, as ds2net's PyTorch prediction gives it."
    model, session = exports[encoder]
    images = _images([(96, 96), (75, 110), (130, 90), (40, 200)])
    got, want = session.predict(images, bs=3), predict_probabilities(model, images, CONFIG, bs=3)
    assert [g.shape for g in got] == [im.shape[:2] for im in images]
    for g, w in zip(got, want):
        assert g.dtype == np.float32 and g.min() >= 0 and g.max() <= 1
        np.testing.assert_allclose(g, w, atol=ATOL, rtol=RTOL)

def test_numpy_preprocessing_is_pytorchs():
    "prepare_batch equals prepare_images; resize_bilinear equals F.interpolate(bilinear, align_corners=False)."
    images = _images([(96, 96), (75, 110), (13, 300)])
    np.testing.assert_array_equal(prepare_batch(images, [64, 80], CONFIG['mean'], CONFIG['std']),
                                  prepare_images(images, (64, 80), CONFIG['mean'], CONFIG['std']).numpy())
    rng = np.random.default_rng(1)
    for shape, size in [((24, 24), (96, 96)), ((96, 96), (75, 110)), ((37, 50), (20, 13)), ((5, 7), (5, 7)), ((1, 9), (4, 3))]:
        a = rng.normal(size=shape).astype(np.float32) * 4
        ref = F.interpolate(torch.from_numpy(a)[None, None], size=size, mode='bilinear', align_corners=False)[0, 0].numpy()
        np.testing.assert_allclose(resize_bilinear(a, size), ref, atol=1e-5)

# ------------------------------------------------------------------ ONNX: graph and metadata

def test_metadata_round_trip(exports):
    "The metadata says how to feed the graph: it is read back as written, with the defaults for threshold and temperature."
    model, session = exports['resnet10t']
    m = session.metadata
    assert m['format'] == 'ds2net-onnx-1' and m['ds2net_version'] == __version__ and m['encoder'] == 'resnet10t'
    assert (m['size'], m['mean'], m['std']) == ([96, 96], CONFIG['mean'], CONFIG['std'])
    assert (m['threshold'], m['temperature'], m['channels'], m['in_chans']) == (0.5, 1.0, 32, 3)
    assert m['input'] == 'image' and m['outputs'] == ['probability', 'logits'] == session.output_names

def test_graph_axes_are_symbols(exports):
    import onnx
    proto = onnx.load(str(exports['resnet10t'][1].path), load_external_data=False)
    for v in [*proto.graph.input, *proto.graph.output]:
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        assert dims[0] == 'batch' and dims[2:] == ['height', 'width'], (v.name, dims)

def test_side_outputs_and_temperature(tmp_path, exports):
    "side_outputs=True adds d1_logits ... s3_logits (PyTorch's side outputs); the temperature divides the logits."
    model = exports['resnet10t'][0]
    session = OnnxModel(export_onnx(model, tmp_path/'side.onnx', CONFIG, side_outputs=True, temperature=2.0, threshold=0.3))
    assert session.output_names == ['probability', 'logits', *[f'{n}_logits' for n in SIDE_OUTPUT_NAMES]]
    assert (session.metadata['temperature'], session.metadata['threshold']) == (2.0, 0.3)
    x = torch.randn(2, 3, 75, 110, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(): side = model(x)
    out = session.run(x.numpy())
    for name, s in zip(ONNX_SIDE_OUTPUTS, side): np.testing.assert_allclose(out[name], s.numpy(), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(out['probability'], torch.sigmoid(sum(side) / 2).numpy(), atol=ATOL, rtol=RTOL)
    images = _images([(50, 70)])
    with torch.no_grad(): fused = sum(model(prepare_images(images, 96, CONFIG['mean'], CONFIG['std'])))
    want = torch.sigmoid(F.interpolate(fused, size=(50, 70), mode='bilinear', align_corners=False) / 2)[0, 0].numpy()
    np.testing.assert_allclose(session.predict(images)[0], want, atol=ATOL, rtol=RTOL)

def test_legacy_exporter_gives_the_same_maps(tmp_path, exports):
    model, session = exports['resnet10t']
    legacy = OnnxModel(export_onnx(model, tmp_path/'legacy.onnx', CONFIG, exporter='legacy'))
    images = _images([(96, 96), (75, 110)])
    for a, b in zip(legacy.predict(images), session.predict(images)): np.testing.assert_allclose(a, b, atol=ATOL, rtol=RTOL)

class FixedSizeNet(nn.Module):
    "Its output is always 64 × 64, whatever the input: a graph with fixed spatial axes."
    def __init__(self): super().__init__(); self.conv = nn.Conv2d(3, 1, 3, padding=1)
    def forward(self, x): return (F.interpolate(self.conv(x), size=(64, 64), mode='bilinear'),)

class ReshapeNet(nn.Module):
    "Reshapes with numbers taken from the traced sample: torch.export bakes them in."
    def __init__(self): super().__init__(); self.conv = nn.Conv2d(3, 1, 3, padding=1)
    def forward(self, x): return (self.conv(x).reshape(x.shape[0], 1, 96, 128),)

FIXED_TAIL = ("so it would take or give only that size. Something in the network's forward turns the size into a constant "
              "(a reshape or a resize to fixed numbers, or a Python number taken from a shape); make the forward follow "
              "its input's size, then export again.")

@pytest.mark.parametrize('net, axes', [
    (FixedSizeNet, 'probability height = 64, probability width = 64, logits height = 64, logits width = 64'),
    (ReshapeNet, 'probability height = 96, probability width = 128, logits height = 96, logits width = 128')])
def test_a_graph_with_fixed_spatial_axes_is_refused(tmp_path, net, axes):
    with pytest.raises(ExportError) as e: export_onnx(net(), tmp_path/'fixed.onnx', CONFIG)
    assert str(e.value) == f"The exported graph has fixed axes ({axes}), {FIXED_TAIL}"
    assert not (tmp_path/'fixed.onnx').exists()

def test_export_refuses_bad_arguments_before_work(tmp_path, exports):
    model = exports['resnet10t'][0]
    (tmp_path/'there.onnx').write_bytes(b'user data')
    cases = [
        (dict(path=tmp_path/'there.onnx'), f"path='{tmp_path}/there.onnx' already exists: ds2net never replaces a file "
                                           f"unless asked; pass overwrite=True to replace it, or choose another path"),
        (dict(path=tmp_path/'there.onnx'/'x.onnx'), f"path='{tmp_path}/there.onnx/x.onnx': {tmp_path}/there.onnx is a "
                                                    f"file, so no folder can be made inside it; choose another path"),
        (dict(exporter='jit'), "exporter='jit': use 'dynamo' (torch.export) or 'legacy' (TorchScript)"),
        (dict(sample_size=(96, 96)), "sample_size=(96, 96): trace with two different sizes of at least 64, so that neither "
                                     "is taken for a constant"),
        (dict(config=dict(size=96)), "config lacks mean, std: give the configuration the model was trained with (a "
                                     "checkpoint's config)"),
    ]
    for kwargs, message in cases:
        args = dict(model=model, path=tmp_path/'new.onnx', config=CONFIG) | kwargs
        with pytest.raises(ParameterError) as e: export_onnx(**args)
        assert str(e.value) == message
    assert (tmp_path/'there.onnx').read_bytes() == b'user data' and not (tmp_path/'new.onnx').exists()
    os.symlink(tmp_path/'there.onnx', tmp_path/'link.onnx')
    with pytest.raises(ParameterError) as e: export_onnx(model, tmp_path/'link.onnx', CONFIG, overwrite=True)
    assert str(e.value) == (f"path='{tmp_path}/link.onnx' is a symbolic link (to {tmp_path}/there.onnx): ds2net never "
                            f"writes through a link, not even with overwrite=True; remove it or choose another path")
    assert (tmp_path/'there.onnx').read_bytes() == b'user data'

def test_onnx_files_that_are_not_ds2net_exports(tmp_path):
    class Double(nn.Module):
        def forward(self, x): return 2 * x
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(Double(), (torch.randn(1, 3, 8, 8),), str(tmp_path/'other.onnx'), dynamo=True, verbose=False)
    (tmp_path/'noise.onnx').write_bytes(np.random.default_rng(0).bytes(512))
    with pytest.raises(WeightsError) as e: load_onnx(tmp_path/'other.onnx')
    assert str(e.value) == (f"{tmp_path}/other.onnx is an ONNX model but not a ds2net export: its metadata has no 'ds2net' "
                            f"entry (the input size, normalisation and threshold `export_onnx` stores). Run other ONNX "
                            f"models with onnxruntime directly.")
    with pytest.raises(WeightsError) as e: load_onnx(tmp_path/'noise.onnx')
    assert str(e.value) == (f"{tmp_path}/noise.onnx is not an ONNX model onnxruntime can load ([ONNXRuntimeError] : 7 : "
                            f"INVALID_PROTOBUF : Load model from {tmp_path}/noise.onnx failed:Protobuf parsing failed.). "
                            f"Export one with `export_onnx` or `ds2net export --format onnx`.")
    with pytest.raises(WeightsError) as e: load_onnx(tmp_path/'missing.onnx')
    assert str(e.value) == f"ONNX file not found: {tmp_path}/missing.onnx"

# ------------------------------------------------------------------ pretrained folders and the card of a run

def test_pvt_round_trip(tmp_path, pvt_export):
    "The paper's encoder: save_pretrained, from_pretrained and the ONNX export give the same maps."
    model, session = pvt_export
    model.inference_config = inference_config(CONFIG)
    model.save_pretrained(tmp_path/'pvt')
    loaded, config = model_from_pretrained(tmp_path/'pvt')
    images = _images([(96, 96), (75, 110)], seed=3)
    a, b, c = predict_probabilities(model, images, CONFIG), predict_probabilities(loaded, images, config), session.predict(images)
    for x, y, z in zip(a, b, c):
        np.testing.assert_array_equal(x, y); np.testing.assert_allclose(z, x, atol=ATOL, rtol=RTOL)
    assert json.loads((tmp_path/'pvt'/CONFIG_NAME).read_text())['drop_path_rate'] == 0.1

# ------------------------------------------------------------------ the model card

@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "A checkpoint as `ds2net train` leaves it (random weights, a synthetic-data config), with its summary.json and a table."
    out = tmp_path_factory.mktemp('run')
    config = {**CONFIG, 'data': 'synthetic:polyp', 'weighting': 'uncertainty', 'lr': 0.003}
    save_checkpoint(out/'best.pth', DS2Net('resnet10t', pretrained=False), config, epoch=6, best=0.71, monitor='dice')
    (out/'summary.json').write_text(json.dumps(dict(epochs=6, best_dice=0.71, n_train=128, n_valid=32, seconds=9.3,
                                                    device='cpu', precision='fp32')))
    cols = ['meanDic', 'meanIoU', 'wFm', 'Sm', 'meanEm', 'maxEm', 'MAE', 'maxDic', 'maxIoU', 'meanSen', 'maxSen', 'meanSpe', 'maxSpe']
    (out/'table.csv').write_text('dataset,' + ','.join(cols) + ',n\nsynthetic-polyp,' + ','.join(f'{0.5 + i / 100:.4f}' for i in range(13)) + ',24\n')
    return out

def test_card_from_a_run(run, tmp_path):
    folder = export_checkpoint(run/'best.pth', tmp_path/'card', format='pretrained', evaluation=run/'table.csv')
    card = ModelCard.load(folder/CARD_NAME)
    d = card.data
    assert (d.library_name, d.license, d.pipeline_tag) == ('ds2net', 'apache-2.0', 'image-segmentation')
    assert {'ds2net', 'medical-imaging', 'image-segmentation', 'synthetic-data', 'pytorch_model_hub_mixin'} <= set(d.tags)
    assert set(d.metrics) == {'dice', 'iou', 'weighted-f-measure', 's-measure', 'e-measure', 'mae', 'sensitivity', 'specificity'}
    assert [(r.dataset_name, r.metric_type, r.metric_value) for r in d.eval_results][:2] == [
        ('synthetic-polyp', 'meanDic', 0.5), ('synthetic-polyp', 'meanIoU', 0.51)]
    assert len(d.eval_results) == 13 and d.model_name == 'DS2Net (resnet10t) trained on synthetic data'
    text = card.text
    for needed in ('**Trained on synthetic data.**', 'not a medical device', 'min-max normalises', '`resnet10t`',
                   'Resize the RGB image to 96 × 96', 'mean [0.485, 0.456, 0.406]', '- data: `synthetic:polyp` — **synthetic images',
                   '- epochs: 6', 'ds2net train --data synthetic:polyp --encoder resnet10t --size 96 --epochs 6 --lr 0.003 --out RUN',
                   '| synthetic-polyp | 0.500 | 0.510 | 0.520 |', '| 24 |', 'The weights: `apache-2.0`', 'arXiv:2508.04131'):
        assert needed in text, needed

def test_training_record(run):
    r = training_record(run/'best.pth')
    assert {k: r[k] for k in ('data', 'size', 'lr', 'epochs', 'best_dice', 'n_train')} == dict(
        data='synthetic:polyp', size=96, lr=0.003, epochs=6, best_dice=0.71, n_train=128)

def test_export_checkpoint_both_formats(run, tmp_path):
    "The function behind `ds2net export`: both forms from one checkpoint give the checkpoint's maps."
    model, config = model_from_checkpoint(run/'best.pth')
    onnx_path = export_checkpoint(run/'best.pth', tmp_path/'m.onnx', format='onnx')
    folder = export_checkpoint(run/'best.pth', tmp_path/'folder', format='pretrained')
    images = _images([(96, 96), (75, 110)], seed=4)
    want = predict_probabilities(model, images, config)
    loaded, loaded_config = model_from_pretrained(folder)
    for a, b, c in zip(want, OnnxModel(onnx_path).predict(images), predict_probabilities(loaded, images, loaded_config)):
        np.testing.assert_allclose(b, a, atol=ATOL, rtol=RTOL); np.testing.assert_array_equal(c, a)
    with pytest.raises(ParameterError) as e: export_checkpoint(run/'best.pth', tmp_path/'m.onnx', format='tflite')
    assert str(e.value) == "format='tflite': use 'onnx' or 'pretrained'"
    with pytest.raises(ParameterError) as e: export_checkpoint(run/'best.pth', tmp_path/'f2', format='pretrained', side_outputs=True)
    assert str(e.value) == "side_outputs=True is for format='onnx': a pretrained folder holds the whole network"
    with pytest.raises(ParameterError) as e: export_checkpoint(run/'best.pth', tmp_path/'m2.onnx', evaluation=run/'table.csv')
    assert str(e.value) == "evaluation goes into the model card of format='pretrained'; an ONNX file has no card"
    with pytest.raises(ParameterError) as e: export_checkpoint(run/'best.pth', tmp_path/'x', format='pretrained', evaluation=tmp_path/'t.csv')
    assert str(e.value) == f"evaluation='{tmp_path}/t.csv': no such file (the CSV `ds2net evaluate --out` writes)"
    assert not (tmp_path/'x').exists()

def test_onnx_model_moves_like_a_pytorch_model(exports):
    "predict_files and evaluate call `model.to(device)`: the CPU is a no-op; CUDA needs onnxruntime's CUDA provider."
    import onnxruntime as ort
    session = exports['resnet10t'][1]
    assert session.to('cpu') is session and session.to(torch.device('cpu')) is session
    if 'CUDAExecutionProvider' in ort.get_available_providers(): pytest.skip('this onnxruntime has the CUDA provider')
    with pytest.raises(ParameterError) as e: session.to('cuda')
    assert str(e.value) == ("device='cuda': this onnxruntime runs ONNX models on the CPU only (install onnxruntime-gpu for "
                            "CUDA); use device='cpu'")

def test_predict_and_evaluate_take_all_three_forms(run, tmp_path):
    "`ds2net predict` and `ds2net evaluate` from a checkpoint, a pretrained folder and an ONNX file: the same maps, the same table."
    from ds2net.inference import predict_files, load_model
    from ds2net.evaluate import evaluate_checkpoint, read_prediction
    from PIL import Image
    sources = {'checkpoint': run/'best.pth',
               'folder': export_checkpoint(run/'best.pth', tmp_path/'folder', format='pretrained'),
               'onnx': export_checkpoint(run/'best.pth', tmp_path/'m.onnx', format='onnx')}
    assert isinstance(load_model(sources['onnx'])[0], OnnxModel) and isinstance(load_model(sources['folder'])[0], DS2Net)
    inp = tmp_path/'images'; inp.mkdir()
    for k, im in enumerate(_images([(96, 96), (75, 110)], seed=5)): Image.fromarray(im).save(inp/f'im{k}.png')
    maps, tables = {}, {}
    for name, src in sources.items():
        written = predict_files(src, inp, tmp_path/f'pred-{name}')
        assert [p.name for p in written] == ['im0.png', 'im1.png']
        maps[name] = [read_prediction(p) for p in written]
        tables[name] = evaluate_checkpoint(src, 'synthetic:polyp', n_synthetic=4)
    for name in ('folder', 'onnx'):
        for a, b in zip(maps['checkpoint'], maps[name]):
            assert np.abs(a - b).max() <= 1 / 255 + 1e-6, name  # PNGs hold probability × 255, rounded
        np.testing.assert_allclose(tables[name].to_numpy(float), tables['checkpoint'].to_numpy(float), atol=2e-3)
    with pytest.raises(Exception) as e: load_model(tmp_path/'images')
    assert 'config.json' in str(e.value)
