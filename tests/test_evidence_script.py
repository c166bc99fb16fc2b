"""scripts/evidence.py on the shipped reference with a tiny budget: fields, seeds, resuming, refusals."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_BUDGET = ['--', '--num-images', '32', '--train-samples', '64', '--val-samples', '64', '--epochs', '1', '-b', '32']


def _evidence(out: Path, *args: str, budget=TINY_BUDGET) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / 'scripts' / 'evidence.py'), '--output', str(out), '--ratios', '0.25',
         '--threads', '1', *args, *budget], capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope='module')
def evidence(tmp_path_factory):
    out = tmp_path_factory.mktemp('evidence')
    result = _evidence(out, '--criteria', 'first', 'random', '--seeds', '0', '1')
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_rows_have_the_fields_and_each_seed(evidence):
    done = json.loads((evidence / 'evidence.json').read_text())
    assert done['images_per_dilution'] == 64 and 0 < done['budget_fraction'] < 1e-4
    assert len(done['runs']) == 4
    rows = {r['criterion']: r for r in done['rows']}
    assert set(rows) == {'first', 'random'}
    for row in rows.values():
        for key in ('criterion', 'ratio', 'mlp_only_layers', 'top1_zero_shot', 'top1_after'):
            assert key in row
        assert row['n'] == 2 and row['seeds'] == [0, 1] and len(row['top1_after_seeds']) == 2
        assert row['top1_after_mean'] == pytest.approx(sum(row['top1_after_seeds']) / 2)
        assert row['top1_after_std'] == pytest.approx(abs(row['top1_after_seeds'][0] - row['top1_after_seeds'][1])
                                                      / 2 ** 0.5)
    assert rows['first']['mlp_only_layers'] == [0, 1, 2]
    assert (evidence / 'evidence.png').stat().st_size > 10_000
    assert '| 3 (25%) | first | 0,1,2 |' in (evidence / 'evidence.md').read_text()


def test_a_new_run_or_another_budget_does_not_overwrite(evidence):
    before = (evidence / 'evidence.json').read_text()
    again = _evidence(evidence, '--criteria', 'first', '--seeds', '0')
    assert again.returncode == 2 and 'holds another run\'s results' in again.stderr
    other = _evidence(evidence, '--criteria', 'first', '--seeds', '0', '--resume',
                      budget=[*TINY_BUDGET, '--epochs', '2'])
    assert other.returncode == 2 and 'images_per_dilution 64, not 128' in other.stderr
    assert (evidence / 'evidence.json').read_text() == before


def test_resume_runs_only_what_is_missing(evidence):
    result = _evidence(evidence, '--criteria', 'first', '--seeds', '0', '1', '2', '--resume')
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count('ratio 0.25') == 1  # only seed 2 of `first` ran
    done = json.loads((evidence / 'evidence.json').read_text())
    assert {r['criterion']: r['n'] for r in done['rows']} == {'first': 3, 'random': 2}
    assert len(done['commands']) == 2
