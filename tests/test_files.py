"""ds2net.files: image names, writes that are whole or absent, stale temporaries, the output-folder guard."""
import pytest

from ds2net.errors import ParameterError
from ds2net.files import (IMAGE_EXTS, TEMP_SUFFIX, atomic_write, check_out_folder, dataset_images_beside, is_image_name,
                          make_out_folder, names_text, remove_if_empty, remove_stale_temps)


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
