#!/usr/bin/env python
"""The last step of launch/gpu_checks.sh: every result of the run as one markdown fragment for docs/benchmarks.md.

  python launch/gpu_report.py OUT WORK    # reads OUT/{env,summary}.txt, OUT/data.json, OUT/kernels.md and
                                          # WORK/*.json (launch/benchmark.py rows); writes OUT/benchmarks.md and
                                          # OUT/results.json (all rows)

A missing input (a step that failed or was skipped) becomes a line saying so; the fragment is written anyway.
"""

import argparse
import json
import sys
from pathlib import Path

GOAL_DATA = 8000  # images/s, both views, one H100/H200 (issue 15)
GOAL_E2E = 0.9  # e2e throughput / model-only throughput
BENCH_FILES = ('model_b', 'e2e_b', 'model_l', 'sweep_bl', 'sweep_h', 'ckpt_h', 'compile_b', 'compile_l')


def read_rows(work: Path) -> dict[str, list[dict]]:
    rows = {}
    for name in BENCH_FILES:
        path = work / f'{name}.json'
        rows[name] = json.loads(path.read_text()) if path.is_file() else []
    return rows


def _fmt(v, spec: str = '.1f', scale: float = 1.0) -> str:
    return '-' if v is None else format(v * scale, spec)


def model_table(rows: list[dict], ckpt: str = '') -> list[str]:
    lines = [
        '| size | ZeRO | micro | act. ckpt | images/s | step ms (median) | TFLOP/s | MFU | peak GiB | note |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        note = r.get('error') or ('fusion off' if r.get('extra', {}).get('fusion') == 'off' else '')
        if r.get('extra', {}).get('compile', 'eager') != 'eager':
            x = r['extra']
            note = (
                note or f'compiled: {x.get("speedup_vs_eager", 0):.2f}x eager, {x.get("compile_s", 0):.0f} s compiling'
            )
        lines.append(
            f'| {r["size"]} | {r["zero_stage"]} | {r["micro_batch"]} | {ckpt or "off"} | '
            f'{_fmt(r["images_per_s_per_device"])} | {_fmt(r["step_ms_median"])} | '
            f'{_fmt(r.get("tflops_per_device"), ".2f")} | {_fmt(r.get("mfu"), ".1f", 100)}% | '
            f'{_fmt(r.get("peak_mem_gib"), ".1f")} | {note} |'
        )
    return lines


def data_section(out: Path) -> list[str]:
    path = out / 'data.json'
    if not path.is_file():
        return ['No data result (the data_torch_gpu step failed or was skipped; see log.txt).']
    lines = []
    for r in json.loads(path.read_text()):
        verdict = 'meets' if r['rate'] >= GOAL_DATA else 'misses'
        lines.append(
            f'{r["name"]}: **{r["rate"]:.0f} images/s** (both views, {r["images"]} images timed, '
            f'{r["cpu_ms"]:.2f} CPU ms/image); {verdict} the {GOAL_DATA:,} images/s goal.'
        )
    return lines


def e2e_section(rows: dict) -> list[str]:
    model = [r for r in rows['model_b'] if r.get('extra', {}).get('fusion') != 'off' and not r.get('error')]
    e2e = [r for r in rows['e2e_b'] if not r.get('error')]
    if not model or not e2e:
        return ['No e2e comparison (model_b or e2e_b failed or was skipped; see log.txt).']
    m, e = model[0], e2e[0]
    ratio = e['images_per_s_per_device'] / m['images_per_s_per_device']
    verdict = 'within' if ratio >= GOAL_E2E else 'outside'
    return [
        f'{m["size"]} ZeRO-{m["zero_stage"]} {m["precision"]} micro {m["micro_batch"]}: '
        f'model only {m["images_per_s_per_device"]:.0f} images/s, '
        f'fed by torch_gpu {e["images_per_s_per_device"]:.0f} images/s = **{ratio:.2f}x** ({verdict} the 10% goal), '
        f'data-wait fraction {_fmt(e.get("data_wait_fraction"), ".2f")}; MFU {_fmt(m.get("mfu"), ".1f", 100)}% '
        f'model only, {_fmt(e.get("mfu"), ".1f", 100)}% fed.'
    ]


def large_section(rows: dict) -> list[str]:
    cells = [r for r in rows['model_l'] if not r.get('error')]
    if not cells:
        return ['No ViT-L cell (model_l failed or was skipped; see log.txt).']
    r = cells[0]
    return [
        f'{r["size"]} ZeRO-{r["zero_stage"]} {r["precision"]} micro {r["micro_batch"]}: '
        f'**{r["images_per_s_per_device"]:.0f} images/s**, MFU {_fmt(r.get("mfu"), ".1f", 100)}%.'
    ]


def fragment(out: Path, work: Path) -> str:
    rows = read_rows(work)
    env = (out / 'env.txt').read_text().strip() if (out / 'env.txt').is_file() else 'env.txt missing'
    summary = (out / 'summary.txt').read_text().strip() if (out / 'summary.txt').is_file() else ''
    parts = [
        '## GPU run (launch/gpu_checks.sh)',
        '',
        '```',
        env,
        '```',
        '',
        '### Steps',
        '',
        '```',
        summary,
        '```',
        '',
        '### torch_gpu data pipeline alone',
        '',
        *data_section(out),
        '',
        '### e2e step against model only',
        '',
        *e2e_section(rows),
        '',
        '### One ViT-L cell',
        '',
        *large_section(rows),
        '',
        '### Model throughput, bf16, ZeRO-1/2/3',
        '',
        *model_table(rows['model_b'] + rows['model_l'] + rows['sweep_bl'] + rows['sweep_h']),
        '',
        '### ViT-H activation checkpointing (ZeRO-2; the rows without it are in the table above)',
        '',
        *model_table(rows['ckpt_h'], ckpt='on'),
        '',
        '### Eager against compiled per block (model.compile=blocks), bf16',
        '',
        *model_table(rows['compile_b'] + rows['compile_l']),
        '',
    ]
    kernels = out / 'kernels.md'
    parts += [
        '### Compiled Triton kernels',
        '',
        kernels.read_text().strip() if kernels.is_file() else 'kernels.md missing (step failed or skipped).',
        '',
    ]
    return '\n'.join(parts)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('out', help="gpu_checks.sh's output folder (its $OUT)")
    parser.add_argument('work', help="gpu_checks.sh's work folder (launch/benchmark.py's JSON rows)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    out, work = Path(args.out), Path(args.work)
    (out / 'benchmarks.md').write_text(fragment(out, work))
    (out / 'results.json').write_text(json.dumps(read_rows(work), indent=1))
    print(f'wrote {out / "benchmarks.md"} and {out / "results.json"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
