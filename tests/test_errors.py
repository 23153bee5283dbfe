"""ds2net.errors: messages that name Python parameters, the same message in flags, and the checks every module uses."""
import pickle
from pathlib import Path

import numpy as np
import pytest

from ds2net.errors import (NO_VALUE, ParameterError, ParameterExistsError, ParameterPathError, WeightsError, check, is_number,
                           is_whole, mismatch_error, python_name, render_message)


def flags(param, value=NO_VALUE):
    flag = '--' + param.replace('_', '-')
    if value is NO_VALUE or value is True: return flag
    return f"{flag} {','.join(map(str, value)) if isinstance(value, tuple) else value}"


def test_a_template_in_python_words_and_in_flags():
    template = "{out=given} already holds {names}: pass {overwrite=True}, or choose another {out} ({n:.1f})"
    values = dict(given=Path('runs/x'), names='a.png', n=2)
    assert render_message(template, values) == "out='runs/x' already holds a.png: pass overwrite=True, or choose another out (2.0)"
    assert render_message(template, values, flags) == "--out runs/x already holds a.png: pass --overwrite, or choose another --out (2.0)"
    assert render_message("{multiscale=s} and {precision='fp32'}", dict(s=(0.5, 1.0)), flags) == "--multiscale 0.5,1.0 and --precision fp32"
    assert python_name('size', np.int64(16)) == 'size=16' and python_name('size') == 'size'
    # text that is not a template is shown as it is (a path or a dict with braces in it)
    for text in ("{'state_dict': ...}", "a {b c} d", "{x!r:>3}"):
        assert render_message(text, {}) == text


def test_parameter_errors_carry_their_parameter_and_survive_fastai_and_pickle():
    e = ParameterError('bs', "{bs=given}: the batch size must be a whole number of at least 1", given=0)
    assert (e.param, str(e), e.render(flags)) == ('bs', 'bs=0: the batch size must be a whole number of at least 1',
                                                    '--bs 0: the batch size must be a whole number of at least 1')
    e.args = ('Exception occured in `Callback` when calling event `before_fit`:\n\t' + e.args[0],)
    assert str(e) == 'bs=0: the batch size must be a whole number of at least 1'
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is ParameterError and again.param == 'bs' and str(again) == str(e)
    assert isinstance(ParameterPathError('inp', 'x'), FileNotFoundError) and isinstance(ParameterExistsError('out', 'x'), FileExistsError)
    w = WeightsError("{path}: resume with the same {encoder}", path='a.pth')
    assert (str(w), w.render(flags), str(pickle.loads(pickle.dumps(w)))) == ('a.pth: resume with the same encoder',
                                                                               'a.pth: resume with the same --encoder',
                                                                               'a.pth: resume with the same encoder')


def test_value_checks():
    assert is_whole(3) and is_whole(np.int16(3)) and not is_whole(True) and not is_whole(np.bool_(True)) and not is_whole(3.0)
    assert is_number(3) and is_number(0.5) and is_number(np.float32(1)) and not is_number(float('inf')) and not is_number(True)
    assert not is_number('1') and not is_number(None)
    check(True, 'bs', 'never shown')
    with pytest.raises(ParameterError, match=r'^lr=-1: positive$'): check(False, 'lr', '{lr=v}: positive', v=-1)
    e = mismatch_error('f.pth and the model', missing=['b', 'a'], unexpected=[f'k{i:02d}' for i in range(14)])
    assert str(e).splitlines()[:3] == ['f.pth and the model does not match:', '  missing keys (2): a, b',
                                       '  unexpected keys (14): k00, k01, k02, k03, k04, k05, k06, k07, k08, k09, k10, k11 ... and 2 more']
    assert mismatch_error('f.pth') is None
