"""ds2net.files: image names, writes that are whole or absent, stale temporaries, the one output guard (files and folders)."""
import pytest

from ds2net.errors import ParameterError, ParameterExistsError
from ds2net.files import (IMAGE_EXTS, TEMP_SUFFIX, atomic_write, atomic_write_text, check_out_file, check_out_folder,
                          dataset_images_beside, is_image_name, make_out_folder, names_text, remove_if_empty,
                          remove_stale_temps)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / 'f.bin'
    assert atomic_write(path, lambda f: f.write(b'first')) == path and path.read_bytes() == b'first'
    def broken(f): f.write(b'half'); raise OSError('disk full')
    with pytest.raises(OSError, match='disk full'): atomic_write(path, broken)
    assert path.read_bytes() == b'first' and sorted(p.name for p in tmp_path.iterdir()) == ['f.bin']
    atomic_write(path, lambda f: f.write(b'second'))
    assert path.read_bytes() == b'second'


def test_remove_stale_temps_removes_only_its_own_temp_files(tmp_path):
    for name in ('best.pth', 'last.pth', 'log.csv', 'mine.txt'): (tmp_path / (name + TEMP_SUFFIX)).write_text('x')
    (tmp_path / 'last.pth').write_text('keep')
    gone = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in gone) == ['best.pth.tmp', 'last.pth.tmp', 'log.csv.tmp']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last.pth', 'mine.txt.tmp']
    assert remove_stale_temps(tmp_path) == []


def test_image_names_and_the_output_folder_guard(tmp_path):
    assert IMAGE_EXTS == ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp')
    for name in ('a.png', 'b.JPG', 'c.tiff', 'd.Bmp'): assert is_image_name(name), name
    for name in ('.a.png', '._b.png', 'c.gif', 'png'): assert not is_image_name(name), name
    afile = tmp_path / 'afile'; afile.write_text('mine')
    with pytest.raises(ParameterError, match=rf"^out='{afile}' is a file, not a folder: give a folder for the run$") as e:
        check_out_folder(afile, purpose='for the run')
    assert e.value.param == 'out'
    with pytest.raises(ParameterError, match=r"is a file, so no folder can be made inside it; choose another pred_dir$"):
        check_out_folder(afile / 'x', 'pred_dir')
    created = make_out_folder(tmp_path / 'a' / 'b' / 'c')
    assert created == tmp_path / 'a' and (tmp_path / 'a' / 'b' / 'c').is_dir() and not list((tmp_path / 'a' / 'b' / 'c').iterdir())
    (tmp_path / 'a' / 'b' / 'keep.txt').write_text('x')
    remove_if_empty(tmp_path / 'a' / 'b' / 'c', created)  # stops at the first folder that holds something
    assert not (tmp_path / 'a' / 'b' / 'c').exists() and (tmp_path / 'a' / 'b' / 'keep.txt').exists()
    assert names_text([tmp_path / f'{i}.png' for i in (3, 1, 2)], 2) == '1.png, 2.png and 1 more'
    (tmp_path / 'set' / 'images').mkdir(parents=True); (tmp_path / 'set' / 'labels').mkdir()
    assert dataset_images_beside(tmp_path / 'set' / 'labels') == tmp_path / 'set' / 'images'
    assert dataset_images_beside(tmp_path / 'set' / 'images') is None


# ------------------------------------------------------------------ the one output guard (issue 16: items 2, 3, 6)

def test_atomic_write_never_writes_through_a_link_planted_as_its_temporary(tmp_path):
    victim = tmp_path / 'victim.pth'; victim.write_bytes(b'a checkpoint')
    (tmp_path / ('log.csv' + TEMP_SUFFIX)).symlink_to(victim)
    atomic_write_text(tmp_path / 'log.csv', 'epoch\n')
    assert victim.read_bytes() == b'a checkpoint'
    assert not (tmp_path / 'log.csv').is_symlink() and (tmp_path / 'log.csv').read_text() == 'epoch\n'


def test_out_file_refuses_existing_files_other_kinds_folders_and_links(tmp_path):
    table = lambda out, **kw: check_out_file(out, suffixes=('.csv',), what='the metrics table', example='metrics.csv', **kw)
    run = tmp_path / 'run'; run.mkdir(); (run / 'best.pth').write_bytes(b'weights')
    old = tmp_path / 'old.csv'; old.write_text('mine')
    with pytest.raises(ParameterExistsError) as e: table(old)
    assert str(e.value) == (f"out='{old}' already exists: ds2net never replaces a file unless asked; pass overwrite=True to "
                            "replace it, or choose another out") and e.value.param == 'out'
    assert table(old, overwrite=True) == old
    with pytest.raises(ParameterError) as e: table(run / 'best.pth', overwrite=True)
    assert str(e.value) == (f"out='{run / 'best.pth'}': the metrics table is written as .csv; give a file name ending in .csv")
    with pytest.raises(ParameterError) as e: table(run)
    assert str(e.value) == f"out='{run}' is a folder: give the name of a file for the metrics table, e.g. {run / 'metrics.csv'}"
    link = tmp_path / 'link.csv'; link.symlink_to(old)
    with pytest.raises(ParameterError) as e: table(link, overwrite=True)
    assert str(e.value) == (f"out='{link}' is a symbolic link (to {old}): ds2net never writes through a link, not even with "
                            "overwrite=True; remove it or choose another out")
    afile = tmp_path / 'afile'; afile.write_text('x')
    with pytest.raises(ParameterError, match=r"is a file, so no folder can be made inside it; choose another json$"):
        check_out_file(afile / 'sub' / 'r.json', 'json', suffixes=('.json',))
    assert old.read_text() == 'mine' and afile.read_text() == 'x'


def test_out_folder_resolves_links_refuses_links_and_existing_names(tmp_path):
    data = tmp_path / 'set'; (data / 'images').mkdir(parents=True); (data / 'masks').mkdir()
    link = tmp_path / 'preds'; link.symlink_to(data / 'masks')
    assert check_out_folder(link) == data / 'masks'          # judged (and written) as the folder it points to
    assert dataset_images_beside(check_out_folder(link)) == data / 'images'
    out = tmp_path / 'out'; out.mkdir()
    elsewhere = tmp_path / 'elsewhere.png'; elsewhere.write_bytes(b'keep')
    (out / 'a.png').symlink_to(elsewhere); (out / 'b.png').write_bytes(b'old')
    with pytest.raises(ParameterError) as e: check_out_folder(out, names=['a.png', 'b.png'], overwrite=True)
    assert str(e.value) == (f"out='{out}' holds symbolic links of the names to write (a.png): ds2net never writes through a "
                            "link, not even with overwrite=True; remove them or choose another out")
    with pytest.raises(ParameterExistsError) as e: check_out_folder(out, names=['b.png', 'c.png'])
    assert str(e.value) == (f"out='{out}' already holds b.png: ds2net never replaces a file unless asked; pass overwrite=True "
                            "to replace them, or choose another out")
    assert check_out_folder(out, names=['b.png', 'c.png'], overwrite=True) == out
    assert elsewhere.read_bytes() == b'keep'


def test_outputs_and_inputs_are_kept_apart(tmp_path):
    data = tmp_path / 'd'; (data / 'images').mkdir(parents=True)
    (data / 'images' / 'a.png').write_bytes(b'img')
    for out, why in [(data / 'images', f"is inside data='{data}', an input of this command: ds2net never writes into its inputs"),
                     (tmp_path, f"contains data='{data}', an input of this command: ds2net keeps its outputs and inputs apart")]:
        with pytest.raises(ParameterError) as e: check_out_folder(out, inputs={'data': data}, overwrite=True)
        assert str(e.value) == f"out='{out}' {why}; choose another out"
    link = tmp_path / 'l'; link.symlink_to(data)
    with pytest.raises(ParameterError, match=r"is inside src="): check_out_folder(link / 'out', inputs={'src': [data]})
    with pytest.raises(ParameterError) as e: check_out_file(data / 'images' / 'a.png', 'csv', True, inputs={'checkpoint': data / 'images' / 'a.png'})
    assert str(e.value).startswith(f"csv='{data / 'images' / 'a.png'}' is checkpoint='{data / 'images' / 'a.png'}' itself, an "
                                   "input of this command: ds2net never writes over its inputs")
    assert check_out_folder(tmp_path / 'new', inputs={'data': data, 'none': None, 'kind': 'synthetic:polyp'}) == tmp_path / 'new'
