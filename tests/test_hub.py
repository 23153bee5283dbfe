"""ds2net.hub through DS2Net: pretrained folders (config.json, model.safetensors, README.md) written and read back
offline and exactly, the files that are not what they claim to be, and the model card's Hub metadata.

Every test runs with the hub switched off (HF_HUB_OFFLINE) and outgoing connections refused and recorded; a test fails
if one was tried. The export side (ONNX, `export_checkpoint`, the card of a run) is tests/test_export.py."""
import json, os, shutil, socket

import numpy as np
import pytest
import torch

import huggingface_hub.constants
from huggingface_hub import ModelCard

from ds2net.errors import ParameterError, WeightsError
from ds2net.model import DS2Net
from ds2net.inference import predict_probabilities
from ds2net.hub import DS2NetHubMixin, inference_config, evaluation_markdown, CONFIG_NAME, WEIGHTS_NAME, CARD_NAME
from ds2net.export import model_from_pretrained

CONFIG = dict(size=96, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])

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


def _images(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]

# ------------------------------------------------------------------ pretrained folders

@pytest.fixture(scope='module')
def tiny_hub():
    torch.manual_seed(1)
    model = DS2Net('resnet10t', pretrained=False)
    model.inference_config = inference_config(CONFIG)
    return model.eval()

@pytest.fixture
def folder(tmp_path, tiny_hub):
    tiny_hub.save_pretrained(tmp_path/'pretrained')
    return tmp_path/'pretrained'

def test_round_trip(folder, tiny_hub):
    "config.json, model.safetensors, README.md; loaded back offline, the same weights and the same maps."
    assert sorted(p.name for p in folder.iterdir()) == [CARD_NAME, CONFIG_NAME, WEIGHTS_NAME]
    cfg = json.loads((folder/CONFIG_NAME).read_text())
    assert cfg['pretrained'] is False and 'encoder_weights' not in cfg
    assert {k: cfg[k] for k in ('format', 'encoder', 'channels', 'in_chans', 'size', 'threshold', 'temperature')} == dict(
        format='ds2net-pretrained-1', encoder='resnet10t', channels=32, in_chans=3, size=[96, 96], threshold=0.5, temperature=1.0)
    import hashlib
    assert cfg['weights_sha256'] == hashlib.sha256((folder/WEIGHTS_NAME).read_bytes()).hexdigest()
    loaded = DS2Net.from_pretrained(folder)
    assert type(loaded) is DS2Net and not loaded.training
    want = tiny_hub.state_dict()
    assert set(loaded.state_dict()) == set(want) and all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    model, config = model_from_pretrained(folder)
    images = _images([(96, 96), (75, 110)])
    for a, b in zip(predict_probabilities(model, images, config), predict_probabilities(tiny_hub, images, CONFIG)):
        np.testing.assert_array_equal(a, b)

def test_the_constructor_never_asks_for_imagenet_weights(folder, monkeypatch):
    "Loading builds the encoder once, with pretrained=False (timm is called through, and its arguments recorded)."
    import timm
    calls, create = [], timm.create_model
    def recording(*args, **kwargs):
        calls.append(kwargs.get('pretrained')); return create(*args, **kwargs)
    monkeypatch.setattr(timm, 'create_model', recording)
    DS2Net.from_pretrained(folder)
    assert calls == [False]

def test_ds2net_pickles(tiny_hub):
    "learn.export pickles the model: DS2Net, with the mixin, survives it."
    import pickle
    again = pickle.loads(pickle.dumps(tiny_hub))
    assert isinstance(again, DS2NetHubMixin) and all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), tiny_hub.state_dict().values()))

def _copy(folder, name):
    broken = folder.parent/name; shutil.copytree(folder, broken); return broken

def _load_error(path)->str:
    with pytest.raises(WeightsError) as e: DS2Net.from_pretrained(path)
    return str(e.value)

def test_truncated_weights(folder):
    broken = _copy(folder, 'truncated'); w = broken/WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[:w.stat().st_size // 2])
    assert _load_error(broken) == (f"{w} cannot be read as safetensors (Error while deserializing header: incomplete "
                                   f"metadata, file not fully covered): the file is damaged or incomplete (an interrupted "
                                   f"copy or download?). Copy it again, or save the folder again.")

def test_tampered_weights(folder):
    "One bit changed in a tensor: safetensors reads it, the checksum in config.json does not match."
    import hashlib
    broken = _copy(folder, 'tampered'); w = broken/WEIGHTS_NAME
    data = bytearray(w.read_bytes()); data[-3] ^= 1; w.write_bytes(bytes(data))
    saved = json.loads((broken/CONFIG_NAME).read_text())['weights_sha256']
    assert _load_error(broken) == (f"{w} is not the file that was saved: its SHA-256 is {hashlib.sha256(data).hexdigest()[:16]}…, "
                                   f"config.json records {saved[:16]}…. The weights changed after saving (damaged, or "
                                   f"edited). Copy the folder again, or save it again from its checkpoint.")
    header = _copy(folder, 'header'); w = header/WEIGHTS_NAME
    data = w.read_bytes(); n = int.from_bytes(data[:8], 'little')
    w.write_bytes(data[:8] + data[8:8 + n].replace(b'"F32"', b'"F16"', 1) + data[8 + n:])
    assert _load_error(header).startswith(f"{w} cannot be read as safetensors (")

def test_config_that_does_not_match_the_weights(folder):
    broken = _copy(folder, 'mismatch')
    cfg = json.loads((broken/CONFIG_NAME).read_text()); cfg['in_chans'] = 1
    (broken/CONFIG_NAME).write_text(json.dumps(cfg))
    assert _load_error(broken) == (
        f"{broken}/model.safetensors and the network of {broken}/config.json (encoder 'resnet10t', channels 32, in_chans 1) "
        f"does not match:\n  wrong shapes (1): encoder.conv1.0.weight (24, 3, 3, 3) (model: (24, 1, 3, 3))\n  config.json "
        f"and model.safetensors of this folder do not belong together: restore the folder's config.json, or save the "
        f"folder again from its checkpoint.")

def test_missing_key_is_not_loaded_silently(folder):
    "The mixin's own loader would leave a missing layer at its random initialisation (strict=False); this one refuses."
    import safetensors.torch, hashlib
    broken = _copy(folder, 'missing-key'); w = broken/WEIGHTS_NAME
    state = safetensors.torch.load_file(str(w)); del state['heads.5.bias']
    w.write_bytes(safetensors.torch.save(state))
    cfg = json.loads((broken/CONFIG_NAME).read_text()); cfg['weights_sha256'] = hashlib.sha256(w.read_bytes()).hexdigest()
    (broken/CONFIG_NAME).write_text(json.dumps(cfg))
    assert _load_error(broken) == (
        f"{w} and the network of {broken}/config.json (encoder 'resnet10t', channels 32, in_chans 3) does not match:\n"
        f"  missing keys (1): heads.5.bias\n  config.json and model.safetensors of this folder do not belong together: "
        f"restore the folder's config.json, or save the folder again from its checkpoint.")

def test_folders_that_are_not_pretrained_folders(folder, tmp_path):
    no_config = _copy(folder, 'no-config'); (no_config/CONFIG_NAME).unlink()
    assert _load_error(no_config) == (f"{no_config} has no config.json, so it is not a ds2net pretrained folder "
                                      f"(`save_pretrained` writes config.json, model.safetensors, README.md). Save it "
                                      f"again, or give the folder that holds them.")
    other = _copy(folder, 'other'); (other/CONFIG_NAME).write_text('{"hidden_size": 64}')
    assert _load_error(other) == (f"{other}/config.json is not a ds2net pretrained config (its format is None, not "
                                  f"'ds2net-pretrained-1'): the folder was not written by ds2net's `save_pretrained`.")
    bad_json = _copy(folder, 'bad-json'); (bad_json/CONFIG_NAME).write_text('{"encoder": ')
    assert _load_error(bad_json) == (f"{bad_json}/config.json is not valid JSON (Expecting value: line 1 column 13 (char "
                                     f"12)): restore the folder's config.json, or save the folder again.")
    assert _load_error(tmp_path/'nowhere') == f"Pretrained folder not found: {tmp_path}/nowhere"
    assert _load_error(folder/CONFIG_NAME).startswith(f"{folder}/config.json is a file, not a pretrained folder")

def test_a_hub_id_without_the_hub():
    "A name that is not a local folder goes to the hub; with the hub off, the error says both."
    message = _load_error('someone/ds2net-model')
    assert message.startswith("someone/ds2net-model is not a local folder, and the Hugging Face hub did not give it (")

def test_save_refuses_to_replace_files(folder, tiny_hub, tmp_path):
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ParameterError) as e: tiny_hub.save_pretrained(folder)
    assert str(e.value) == (f"save_directory='{folder}' already holds README.md, config.json, model.safetensors: ds2net "
                            f"never replaces a file unless asked; pass overwrite=True to replace them, or choose another "
                            f"save_directory")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    tiny_hub.save_pretrained(folder, overwrite=True)  # asked: replaced
    (tmp_path/'linked').mkdir(); os.symlink(tmp_path/'elsewhere.md', tmp_path/'linked'/CARD_NAME)
    with pytest.raises(ParameterError) as e: tiny_hub.save_pretrained(tmp_path/'linked', overwrite=True)
    assert str(e.value) == (f"save_directory='{tmp_path}/linked' holds symbolic links of the names to write (README.md): "
                            f"ds2net never writes through a link, not even with overwrite=True; remove them or choose "
                            f"another save_directory")
    assert not (tmp_path/'elsewhere.md').exists()

# ------------------------------------------------------------------ the model card

def test_card_without_a_table_or_a_run(tiny_hub):
    card = tiny_hub.generate_model_card()
    again = ModelCard(str(card))   # what ModelCard.load parses: the YAML header must be valid Hub metadata
    assert again.data.eval_results is None and again.data.metrics == ['dice', 'iou'] and 'synthetic-data' not in again.data.tags
    assert 'Training was not recorded with these weights.' in again.text
    assert evaluation_markdown(None) in again.text and 'ds2net evaluate' in evaluation_markdown(None)
    assert f"| parameters | {sum(p.numel() for p in tiny_hub.parameters()):,} |" in again.text

