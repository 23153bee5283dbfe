"""The demo of `ds2net.demo`: it writes only into its own folder (issue 16, item 5)."""
import json
import pytest
from support import md5


def test_the_demo_never_replaces_a_real_run(tmp_path, monkeypatch, capsys):
    "Item 5: `ds2net demo --out runs/realrun` once replaced a real run's best.pth, last.pth and log.csv."
    import ds2net.demo
    from ds2net.cli import main
    from ds2net.errors import ParameterExistsError
    from ds2net.demo import run_demo
    monkeypatch.setattr(ds2net.demo, 'DEMO_CONFIG', dict(ds2net.demo.DEMO_CONFIG, size=64, n_synthetic=32, bs=8))
    monkeypatch.setattr(ds2net.demo, 'DEMO_TEST_IMAGES', 6)
    real = tmp_path / 'realrun'
    real.mkdir()
    for name in ('best.pth', 'last.pth', 'log.csv'): (real / name).write_text(f'the real run\'s {name}')
    files = {p.name: md5(p) for p in real.iterdir()}
    with pytest.raises(ParameterExistsError) as e: run_demo(real, epochs=1)
    assert e.value.param == 'out' and str(e.value) == (
        f"out={str(real)!r} holds best.pth, last.pth, log.csv and is not a demo's folder (it has no demo.json): the demo "
        "replaces the files of its folder, so it writes only into a new or empty folder or one a demo wrote. Choose another "
        "out (the default is outputs/demo), or pass overwrite=True to replace its files (best.pth, last.pth, log.csv, "
        "summary.json, weights.png, metrics.csv, predictions.png, demo.json)")
    assert main(['demo', '--out', str(real), '--epochs', '1']) == 1
    assert capsys.readouterr().err.startswith(f"ds2net demo: error: --out {real} holds best.pth, last.pth, log.csv and is "
                                              "not a demo's folder (it has no demo.json)")
    assert {p.name: md5(p) for p in real.iterdir()} == files
    demo = tmp_path / 'demo'
    first = run_demo(demo, epochs=1)  # a new folder: marked, then written
    assert first['demo'] is True and json.loads((demo / 'demo.json').read_text())['demo'] is True
    (demo / 'metrics.csv').write_text('stale')
    second = run_demo(demo, epochs=1)  # a demo's folder is replaced freely
    assert second['demo'] is True and (demo / 'metrics.csv').read_text() != 'stale'
    assert json.loads((demo / 'summary.json').read_text())['meanDic'] == pytest.approx(second['meanDic'])
    summary = run_demo(real, epochs=1, overwrite=True)  # asked for: the real run's files are replaced
    assert summary['demo'] is True and (real / 'demo.json').is_file() and md5(real / 'best.pth') != files['best.pth']
