"""Side-by-side inference benchmarks: throughput, latency, peak memory, parameters and FLOPs.

Models are timed alternately (round-robin, the order rotating each round) after a shared warm-up, so that
a machine whose load changes during the run slows every model alike; medians are reported, and the
throughput ratio of two models is the median of their per-round ratios (the ratio of the medians is reported
beside it). A model whose timings spread widely (interquartile range over `NOISY_SPREAD` of the median: a busy
machine) is flagged `noisy` in the results, the table and the plot.
"""
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import timm
from timm.models import get_model_input_config

from .atomic import save_figure, write_json, write_text
from .evaluate import autocast

__all__ = ['compare_models', 'count_params', 'count_flops', 'machine_info', 'format_markdown', 'plot_results',
           'write_results', 'NOISY_SPREAD']

# relative spread (IQR / median) of a model's timings above which its figures are flagged as noisy
NOISY_SPREAD = 0.10


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size: Sequence[int], device: torch.device) -> int:
    """FLOPs of one forward pass on one image, counted by `torch.utils.flop_counter` (a multiply-add is 2)."""
    x = torch.randn(1, *input_size, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def machine_info(device: torch.device) -> Dict[str, Any]:
    """What the numbers were measured on."""
    info = {
        'device': str(device),
        'cpu': _cpu_name(),
        'cpu_count': os.cpu_count(),
        'torch_threads': torch.get_num_threads(),
        'python': platform.python_version(),
        'torch': torch.__version__,
        'timm': timm.__version__,
    }
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _input_size(model: nn.Module) -> Tuple[int, ...]:
    return tuple(get_model_input_config(model)['input_size'])


def _forward_seconds(model: nn.Module, x: torch.Tensor, device: torch.device, amp: bool, number: int = 1) -> float:
    """Seconds per forward pass, averaged over `number` back-to-back passes."""
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode(), autocast(device, amp):
        for _ in range(number):
            model(x)
    _sync(device)
    return (time.perf_counter() - start) / number


def _peak_memory_mb(model: nn.Module, x: torch.Tensor, device: torch.device, amp: bool) -> Optional[float]:
    """CUDA: peak memory allocated during one forward, over what was allocated before it. CPU: not measured."""
    if device.type != 'cuda':
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    _forward_seconds(model, x, device, amp)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def _iqr(values: List[float]) -> Tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def compare_models(
        models: Dict[str, nn.Module],
        batch_size: int = 8,
        device: str = 'cpu',
        amp: bool = False,
        compile: bool = False,
        warmup: int = 3,
        repeats: int = 10,
        baseline: Optional[str] = None,
        min_seconds: float = 0.1,
) -> Dict[str, Any]:
    """Benchmark models side by side.

    Args:
        models: Name -> model; each gets inputs of its own current input size.
        batch_size: Images per forward pass.
        device: `cpu` or `cuda`.
        amp: bf16 autocast.
        compile: `torch.compile` each model (compilation happens during warm-up).
        warmup: Untimed rounds.
        repeats: Timed rounds; each times every model once.
        baseline: Name of the model the others are compared with (default: the last one).
        min_seconds: Each timing spans enough back-to-back forward passes (fixed after the warm-up) to
            last about this long, so that fast models are not timed on a single short pass.

    Returns:
        A JSON-ready dict: settings, `machine`, per-model `models[name]` (params, flops_per_image,
        throughput / latency medians and samples, peak memory) and `ratios[name]` against the baseline.
    """
    if not models:
        raise ValueError('No models to benchmark.')
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f'Need batch_size >= 1, repeats >= 1, warmup >= 0 (got {batch_size}, {repeats}, {warmup}).')
    baseline = baseline or list(models)[-1]
    if baseline not in models:
        raise ValueError(f'Baseline {baseline!r} is not one of the models {list(models)}.')
    device = torch.device(device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError('CUDA device asked for but CUDA is not available.')

    names = list(models)
    runners, inputs, results = {}, {}, {}
    for name, model in models.items():
        model = model.eval().to(device)
        input_size = _input_size(model)
        results[name] = {
            'params': count_params(model),
            'flops_per_image': count_flops(model, input_size, device),
            'param_memory_mb': sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 2 ** 20,
            'input_size': list(input_size),
        }
        inputs[name] = torch.randn(batch_size, *input_size, device=device)
        runners[name] = torch.compile(model) if compile else model

    number = {}
    for _ in range(warmup):
        for name in names:
            _forward_seconds(runners[name], inputs[name], device, amp)
    for name in names:
        number[name] = max(1, round(min_seconds / _forward_seconds(runners[name], inputs[name], device, amp)))
        results[name]['forwards_per_timing'] = number[name]
    seconds = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            seconds[name].append(_forward_seconds(runners[name], inputs[name], device, amp, number[name]))

    for name in names:
        throughput = [batch_size / s for s in seconds[name]]
        latency = [1000 * s for s in seconds[name]]
        lo, hi = _iqr(throughput)
        spread = (hi - lo) / statistics.median(throughput)
        results[name].update(
            throughput=statistics.median(throughput),
            throughput_iqr=[lo, hi],
            spread=spread,
            noisy=spread > NOISY_SPREAD,
            latency_ms=statistics.median(latency),
            latency_iqr_ms=list(_iqr(latency)),
            throughput_samples=throughput,
            peak_memory_mb=_peak_memory_mb(runners[name], inputs[name], device, amp),
        )
    ratios = {}
    for name in names:
        if name == baseline:
            continue
        base = results[baseline]
        paired = [b / m for m, b in zip(seconds[name], seconds[baseline])]  # same-round throughput ratios
        ratios[name] = {
            'baseline': baseline,
            'throughput': statistics.median(paired),
            'throughput_iqr': list(_iqr(paired)),
            'throughput_of_medians': results[name]['throughput'] / base['throughput'],
            'latency': results[name]['latency_ms'] / base['latency_ms'],
            'params': results[name]['params'] / base['params'],
            'flops': results[name]['flops_per_image'] / base['flops_per_image'],
        }
    return {
        'batch_size': batch_size,
        'amp': amp,
        'compile': compile,
        'warmup': warmup,
        'repeats': repeats,
        'baseline': baseline,
        'machine': machine_info(device),
        'noisy_spread': NOISY_SPREAD,
        'noisy': [name for name in names if results[name]['noisy']],
        'models': results,
        'ratios': ratios,
    }


def _fmt_mem(mb: Optional[float]) -> str:
    return 'n/a' if mb is None else f'{mb:,.0f}'


def format_markdown(results: Dict[str, Any], command: Optional[str] = None) -> str:
    """A markdown table of the results, the throughput ratio lines and the machine they were measured on."""
    m = results['machine']
    hw = m.get('gpu') or f'{m["cpu"]} ({m["cpu_count"]} cores, {m["torch_threads"]} torch threads)'
    mode = ', '.join(filter(None, ['bf16 autocast' if results['amp'] else 'fp32', 'torch.compile' if results['compile'] else '']))
    lines = [
        f'Batch {results["batch_size"]}, {m["device"]}, {mode}; {results["warmup"]} warm-up + {results["repeats"]} '
        f'timed rounds, models alternating, medians (IQR). Machine: {hw}; torch {m["torch"]}, timm {m["timm"]}.',
    ]
    if command:
        lines.append(f'Command: `{command}`')
    lines += [
        '',
        '| model | params (M) | GFLOPs / img | throughput (img/s) | latency (ms / batch) | peak memory (MB) |',
        '|---|---:|---:|---:|---:|---:|',
    ]
    for name, r in results['models'].items():
        lo, hi = r['throughput_iqr']
        lines.append(
            f'| {name} | {r["params"] / 1e6:.2f} | {r["flops_per_image"] / 1e9:.2f} | '
            f'{r["throughput"]:,.1f} ({lo:,.1f}-{hi:,.1f}) | {r["latency_ms"]:,.1f} | {_fmt_mem(r["peak_memory_mb"])} |')
    lines.append('')
    for name, ratio in results['ratios'].items():
        lo, hi = ratio['throughput_iqr']
        lines.append(
            f'throughput ratio {name}/{ratio["baseline"]}: **{ratio["throughput"]:.3f}** ({lo:.3f}-{hi:.3f}), the '
            f'median of the per-round ratios; the ratio of the table\'s medians is '
            f'{ratio["throughput_of_medians"]:.3f} (params {ratio["params"]:.3f}, FLOPs {ratio["flops"]:.3f})')
    if results['noisy']:
        lines.append(
            f'**Warning: noisy timings** for {", ".join(results["noisy"])}: the interquartile range is over '
            f'{results["noisy_spread"]:.0%} of the median (a busy machine?); treat the figures as rough, and re-run '
            f'on a quiet machine or with more --repeats.')
    if results['machine']['device'].startswith('cpu'):
        lines.append('(peak memory is measured on CUDA only)')
    return '\n'.join(lines) + '\n'


def plot_results(results: Dict[str, Any], path: os.PathLike) -> Path:
    """Bar charts of throughput (median, IQR whiskers) and GFLOPs per image."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    names = list(results['models'])
    rs = [results['models'][n] for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(names), 4))
    thr = [r['throughput'] for r in rs]
    err = [[t - r['throughput_iqr'][0] for t, r in zip(thr, rs)], [r['throughput_iqr'][1] - t for t, r in zip(thr, rs)]]
    noisy = [r.get('noisy', False) for r in rs]
    ax1.bar(names, thr, yerr=err, capsize=4, color=['tab:red' if n else 'tab:blue' for n in noisy])
    ax1.set_ylabel('images / s')
    ax1.set_title(f'throughput, batch {results["batch_size"]} ({results["machine"]["device"]})'
                  + ('\nNOISY (red): wide spread, a busy machine' if any(noisy) else ''))
    ax2.bar(names, [r['flops_per_image'] / 1e9 for r in rs], color='tab:orange')
    ax2.set_ylabel('GFLOPs / image')
    ax2.set_title('compute')
    for ax in (ax1, ax2):
        ax.tick_params(axis='x', labelrotation=20)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def write_results(results: Dict[str, Any], output_dir: os.PathLike, command: Optional[str] = None) -> Dict[str, str]:
    """Write `bench.json`, `bench.md` and `bench.png` into `output_dir`; returns their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {'json': output_dir / 'bench.json', 'markdown': output_dir / 'bench.md', 'plot': output_dir / 'bench.png'}
    write_text(paths['markdown'], format_markdown(results, command))
    plot_results(results, paths['plot'])
    write_json(paths['json'], dict(results, command=command, files={k: str(v) for k, v in paths.items()}))
    return {k: str(v) for k, v in paths.items()}
