"""The markdown summary of a tools/gpu_check.sh folder: python tools/gpu_summary.py DIR"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, to run as a script

from checkpoints import load_checkpoint  # noqa: E402


def read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def rows_of(data) -> list[dict]:
    if data is None:
        return []
    return data["runs"] if "runs" in data else [data]


def bench_table(out: Path) -> list[str]:
    """One line per measured setting, the textbook step first, speed-ups against it."""
    lines = ["| arch | batch | precision | layout | compiled | step ms | seq/s | vs textbook | peak MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for base in sorted(out.glob("bench_*_b*.json")):
        if base.stem.endswith(("_cl", "_compile")):
            continue
        rows = rows_of(read(base))
        variants = [rows_of(read(base.with_name(f"{base.stem}{s}.json"))) for s in ("_cl", "_compile")]
        if not rows:
            continue
        ref = rows[0]
        if ref.get("reference_step_ms"):
            lines.append(f"| {ref['arch']} | {ref['batch_size']} | textbook fp32 | NCHW | no | "
                         f"{ref['reference_step_ms']:.1f} | {ref['reference_seq_per_s']:.1f} | 1.00x | "
                         f"{ref['reference_peak_mem_mb']:.0f} |")
        for row in rows + [r for v in variants for r in v]:
            speedup = (row["seq_per_s"] / ref["reference_seq_per_s"]
                       if ref.get("reference_seq_per_s") else None)
            precision = {"none": "fp32 (TF32 convs)" if row["device"].startswith("cuda") else "fp32"
                         }.get(row["amp"], row["amp"])
            compiled = f"yes ({row['compile_s']:.0f} s to compile)" if row.get("compile_s") else \
                ("yes" if row["compile"] else "no")
            lines.append(f"| {row['arch']} | {row['batch_size']} | {precision} | "
                         f"{'channels_last' if row['channels_last'] else 'NCHW'} | {compiled} | "
                         f"{row['step_ms']:.1f} | {row['seq_per_s']:.1f} | "
                         f"{'-' if speedup is None else f'{speedup:.2f}x'} | {row['peak_mem_mb']:.0f} |")
    return lines


def run_lines(run: Path, title: str) -> list[str]:
    """What a training run of the check did, from its checkpoint and metrics."""
    ckpt = run / "checkpoints" / "last.pt"
    if not ckpt.is_file():
        return []
    state = load_checkpoint(ckpt)
    config = state["config"]
    seqs = state["step"] * config["batch_size"] * config.get("world_size", 1)
    history = state.get("history", [])
    last = history[-1] if history else None
    # A run whose schedule was fitted to the budget ends before it: time its epochs instead.
    done = bool(history) and len(history) == config["epochs"] and state.get("position", 0) == 0
    minutes = (sum(r["seconds"] for r in history) / 60 if done else 0) or config["time_budget"]
    text = (f"{state['step']} steps of batch {config['batch_size']} x {config.get('world_size', 1)} "
            f"process(es), {seqs} sequences in {minutes:.3g} min "
            f"({seqs / 60 / minutes:.1f} sequences/s with validation), "
            f"{config['arch']}, precision {config.get('precision')}, {len(history)} epoch(s) finished")
    if config.get("fitted"):
        fitted = config["fitted"]
        text += (f" of the {fitted['epochs']} fitted to the {config['time_budget']:g} min budget "
                 f"({fitted['step_seconds']:.3g} s a step measured)")
    if last:
        text += f"; last validation: loss {last['val_loss']:.5f}, MSE {last['mse']:.1f}"
    return [f"**{title}:** {text}.", ""]


def main(argv=None) -> None:
    out = Path((argv or sys.argv[1:])[0])
    env = read(out / "env.json") or {}
    gpu = f"{env.get('gpu')} ({env.get('gpu_memory_gib')} GiB)" if env.get("gpu") else "no GPU (CPU)"
    lines = [f"# GPU check: {gpu}", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, "
             f"{env.get('gpus', 0)} GPU(s), bf16 {'yes' if env.get('bf16') else 'no'}.", "",
             "## Training step (tools/bench.py; forward, backward, Adam)", "", *bench_table(out), ""]
    lines += run_lines(out / "run", "`python main.py` with the defaults")
    scores = read(out / "evaluate.json")
    if scores:
        lines += [f"## evaluate.py on {scores['sequences']} held-out sequences "
                  f"({scores['seq_per_s']:.0f} sequences/s)", "",
                  "| model | MSE | MAE | SSIM | SSIM (OpenSTL's data_range 2) | PSNR |",
                  "|---|---|---|---|---|---|"]
        for name in ("model", "copy_last_baseline"):
            m = scores[name]
            lines.append(f"| {name} | {m['mse']:.2f} | {m['mae']:.2f} | {m['ssim']:.4f} | "
                         f"{m['ssim_openstl']:.4f} | {m['psnr']:.2f} |")
        lines.append("")
    lines += run_lines(out / "ddp", "torchrun over every GPU")
    failed = (out / "failed.txt").read_text().strip() if (out / "failed.txt").is_file() else ""
    if failed:
        lines += ["## Failed steps", "", *(f"- {line}" for line in failed.splitlines()), ""]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
