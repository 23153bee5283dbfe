"""Does the test suite catch a broken library? `make mutants` breaks ds2net on purpose, one plausible bug at a time, and
reports which breakages the tests let through.

Each breakage replaces one line (or a few) of one named function of the exported package with a plausible bug: the
first four are the ones a review found that 140 tests let through. The breakage is applied to a copy of the package
in a scratch folder (never to `ds2net/` itself), and the tests that should catch it run against that copy. A breakage
is caught when those tests fail. Exit status 1 if any survives.

    python tools/mutants.py                 # all breakages
    python tools/mutants.py --only predict  # those whose name contains 'predict'
    python tools/mutants.py --list          # just list them

`make mutmut` (tools/mutmut.sh) is the other half: mutmut generates its own mutants of losses, blocks and callbacks.
"""
import argparse, os, shutil, subprocess, sys, tempfile, time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Breakage:
    name: str      # short id
    module: str    # file in ds2net/
    function: str  # the function or method it breaks
    why: str       # the bug, as a reviewer would describe it
    old: str       # text that must occur exactly once in the module
    new: str       # what it becomes
    tests: tuple   # pytest arguments that should catch it


BREAKAGES = [
    Breakage('predict-inverted', 'inference.py', 'predict_probabilities', 'every prediction inverted: 1 − p',
             "probs.append(torch.sigmoid(up)[0, 0].cpu().numpy())", "probs.append(1 - torch.sigmoid(up)[0, 0].cpu().numpy())",
             ('tests/test_pinned_behaviour.py', '-k', 'predict or dice_floor or evaluate_scores')),
    Breakage('resume-loads-nothing', 'checkpoint.py', 'load_training_state', 'weights and optimizer never restored on --resume',
             "    ckpt = load_checkpoint_into(learn.model, source, path)\n    if ckpt.get('opt') is not None:",
             "    ckpt = source if isinstance(source, dict) else read_checkpoint(source)\n    if False:",
             ('tests/test_pinned_behaviour.py', '-k', 'resume')),
    Breakage('nonfinite-after-step', 'callbacks.py', 'NonFiniteLossCallback', 'the NaN check runs after the optimizer step, so the bad step is taken',
             "    order, run_valid = MixedPrecision.order - 1, False  # before fp16's scaler could skip the step silently\n    def before_step(self):",
             "    order, run_valid = MixedPrecision.order - 1, False  # before fp16's scaler could skip the step silently\n    def after_step(self):",
             ('tests/test_pinned_behaviour.py', '-k', 'nonfinite')),
    Breakage('reference-dem-convs-swapped', 'weights.py', '_REFERENCE_RULES', "the authors' first DEM conv loaded into the second, and back",
             "r'detail_path.{0}.detail_conv_a.weight', (-1,)),\n    (r'DEM(\\d+)\\.conv2\\.weight',             r'detail_path.{0}.detail_conv_b.weight'",
             "r'detail_path.{0}.detail_conv_b.weight', (-1,)),\n    (r'DEM(\\d+)\\.conv2\\.weight',             r'detail_path.{0}.detail_conv_a.weight'",
             ('tests/test_weights.py', '-k', 'authors or rule or reference')),
    Breakage('normalise-swapped', 'inference.py', 'prepare_images', 'mean and std swapped when preparing an image for prediction',
             "return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)",
             "return (x - torch.tensor(std).view(1, 3, 1, 1)) / torch.tensor(mean).view(1, 3, 1, 1)",
             ('tests/test_pinned_behaviour.py', '-k', 'predict')),
    Breakage('fuse-mean', 'model.py', 'fuse_side_outputs', 'the fused prediction averages the six logits instead of adding them',
             "return torch.stack(tuple(side_outputs)).sum(0)", "return torch.stack(tuple(side_outputs)).mean(0)",
             ('tests/test_callbacks.py', '-k', 'side_outputs_and_the_rest')),
    Breakage('heads-order', 'model.py', 'DS2Net.forward_with_masks', 'side outputs in the order s1, s2, s3, d1, d2, d3',
             "for head, f in zip(self.heads, detail + semantic))", "for head, f in zip(self.heads, semantic + detail))",
             ('tests/test_model.py', '-k', 'side_outputs_are_their_heads or reference')),
    Breakage('boundary-weight-no-abs', 'losses.py', 'boundary_weights', 'the boundary weight loses its absolute value',
             "return 1 + 5 * torch.abs(F.avg_pool2d(mask, kernel_size=31, stride=1, padding=15) - mask)",
             "return 1 + 5 * (F.avg_pool2d(mask, kernel_size=31, stride=1, padding=15) - mask)",
             ('tests/test_losses.py',)),
    Breakage('weights-sum-not-max', 'losses.py', 'uncertainty_weights', 'weights normalised by their sum instead of their maximum',
             "return (a / a.max()).detach(), u.detach()", "return (a / a.sum()).detach(), u.detach()",
             ('tests/test_losses.py',)),
    Breakage('nnunet-unnormalised', 'losses.py', 'fixed_weights', "'nnunet' weights not normalised to sum 1",
             "if weighting == 'nnunet': return w / w.sum()", "if weighting == 'nnunet': return w",
             ('tests/test_losses.py',)),
    Breakage('dem-residual-up', 'blocks.py', 'DEM.forward', 'the DEM adds the upsampled high-level map instead of low',
             "if self.residual: out = out + low", "if self.residual: out = out + up",
             ('tests/test_model.py', '-k', 'dem')),
    Breakage('sem-pool-order', 'blocks.py', 'SEM.semantic_mask', 'max and mean swapped in the spatial attention',
             "pooled = torch.cat([up.mean(dim=1, keepdim=True), up.amax(dim=1, keepdim=True)], dim=1)",
             "pooled = torch.cat([up.amax(dim=1, keepdim=True), up.mean(dim=1, keepdim=True)], dim=1)",
             ('tests/test_model.py', '-k', 'sem')),
    Breakage('dice-empty-zero', 'scores.py', 'overlap_scores', 'an image with no lesion, correctly predicted empty, scores Dice 0',
             "dice = torch.where(ps + gs > 0, 2 * inter / (ps + gs).clamp_min(1), one)",
             "dice = torch.where(ps + gs > 0, 2 * inter / (ps + gs).clamp_min(1), 0 * one)",
             ('tests/test_scores.py', '-k', 'per_image')),
    Breakage('clip-by-norm', 'callbacks.py', 'GradientClipValue.before_step', 'clipping by norm where by value was asked for',
             "def before_step(self): nn.utils.clip_grad_value_(self.learn.model.parameters(), self.clip)",
             "def before_step(self): nn.utils.clip_grad_norm_(self.learn.model.parameters(), self.clip)",
             ('tests/test_callbacks.py', '-k', 'clipping')),
    Breakage('log-before-checkpoint', 'checkpoint.py', 'CheckpointCallback.after_epoch', 'the log written before last.pth, so it can run ahead of it',
             "        save_checkpoint(self.out/'last.pth', self.learn.model, self.config, **state)\n        self.saved_epochs = epochs_done\n        self.write_log(epochs_done)",
             "        self.write_log(epochs_done)\n        save_checkpoint(self.out/'last.pth', self.learn.model, self.config, **state)\n        self.saved_epochs = epochs_done",
             ('tests/test_pinned_behaviour.py', '-k', 'runs_ahead')),
    Breakage('default-lr-swapped', 'learner.py', 'default_lr', 'the fine-tuning rate used from scratch and the other way round',
             "return FINE_TUNE_LR if weights_loaded else FROM_SCRATCH_LR", "return FROM_SCRATCH_LR if weights_loaded else FINE_TUNE_LR",
             ('tests/test_cli.py', '-k', 'default_lr or paper_lr')),
    Breakage('predict-overwrites', 'files.py', 'check_out_folder', "the one output guard (predict's too) replaces the user's "
             "files without --overwrite", "if existing and not overwrite:", "if existing and overwrite:",
             ('tests/test_cli.py', '-k', 'predict_refuses')),
    Breakage('uncertainty-no-half', 'losses.py', 'pixel_uncertainty', 'uncertainty not divided by 0.5, so it stays in [0, 0.5]',
             "return 1 - (prob - 0.5).abs() / 0.5",
             "return 1 - (prob - 0.5).abs()",
             ('tests/test_losses.py',)),
]


def copy_project(dest:Path):
    "The package and the tests, as the tests need them (not nbs/, docs/ or the virtual environments)."
    for name in ('ds2net', 'tests'):
        shutil.copytree(ROOT/name, dest/name, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    for name in ('settings.ini', 'setup.py', 'pyproject.toml', 'pytest.ini', 'setup.cfg'):
        if (ROOT/name).exists(): shutil.copy2(ROOT/name, dest/name)


def apply(b:Breakage, pkg:Path):
    path = pkg/b.module
    text = path.read_text()
    n = text.count(b.old)
    if n != 1: raise SystemExit(f"{b.name}: the text to break occurs {n} times in ds2net/{b.module} (expected once); "
                                f"update the breakage to the current code of {b.function}")
    path.write_text(text.replace(b.old, b.new))


def run_tests(work:Path, args, timeout:int=900)->tuple:
    env = dict(os.environ, PYTHONPATH=str(work), PYTHONHASHSEED='0', PYTHONDONTWRITEBYTECODE='1')
    cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', '--no-header', *args]
    t0 = time.time()
    try: proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired: return 'timeout', time.time() - t0, ''
    return proc.returncode, time.time() - t0, proc.stdout + proc.stderr


def first_failure(output:str)->str:
    for line in output.splitlines():
        if line.startswith('FAILED '): return line[len('FAILED '):].split(' - ')[0]
    return ''


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--only', default='', help='run the breakages whose name contains this text')
    ap.add_argument('--list', action='store_true', help='list the breakages and stop')
    opts = ap.parse_args()
    chosen = [b for b in BREAKAGES if opts.only in b.name]
    if opts.list:
        for b in chosen: print(f'{b.name:30} {b.module}:{b.function}: {b.why}')
        return 0
    with tempfile.TemporaryDirectory(prefix='ds2net-mutants-') as tmp:
        work = Path(tmp)/'project'
        copy_project(work)
        pristine = {p.name: p.read_text() for p in (work/'ds2net').glob('*.py')}
        where = subprocess.run([sys.executable, '-c', 'import ds2net; print(ds2net.__file__)'], cwd=work,
                               env=dict(os.environ, PYTHONPATH=str(work)), capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(work)): raise SystemExit(f'the tests would import {where}, not the scratch copy')
        for b in chosen: apply(b, work/'ds2net'); (work/'ds2net'/b.module).write_text(pristine[b.module])  # all apply cleanly
        rows, survived = [], []
        print(f'{len(chosen)} breakages, each against the tests that should catch it (scratch copy: {work})\n', flush=True)
        for b in chosen:
            apply(b, work/'ds2net')
            rc, seconds, out = run_tests(work, b.tests)
            (work/'ds2net'/b.module).write_text(pristine[b.module])
            caught = rc not in (0, 5, 'timeout')
            by = first_failure(out) if caught else ('timed out' if rc == 'timeout' else 'no test failed')
            if not caught: survived.append(b)
            print(f"{'caught  ' if caught else 'SURVIVED'} {b.name:30} {seconds:6.1f} s  {b.module}:{b.function}  <- {by}", flush=True)
        # the unbroken copy must pass the same tests, or "caught" means nothing
        clean = sorted({tuple(b.tests) for b in chosen})
        broken_clean = [t for t in clean if run_tests(work, t)[0] != 0]
        print(f"\n{len(chosen) - len(survived)} of {len(chosen)} breakages caught; "
              f"the unbroken package passes {len(clean) - len(broken_clean)} of {len(clean)} of the same test selections")
        for t in broken_clean: print('  the unbroken package FAILS:', ' '.join(t))
        for b in survived: print(f'  survived: {b.name} ({b.module}:{b.function}): {b.why}')
        return 1 if survived or broken_clean else 0


if __name__ == '__main__': sys.exit(main())
