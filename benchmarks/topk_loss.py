"""The head loss step through autograd against its gradient written out: the teacher cache's folded top-K
forward KL, and a live teacher's forward KL, reverse KL and JSD.

One distillation batch's head loss at the shapes of the recovery benchmark's cache runs (8 x 255 positions,
SmolLM2's 49,152-token vocabulary, the 90M student's hidden 480, K in --k; a live teacher's hidden 576),
forward and backward, through `taille.distill.losses`: `autograd` runs the loss under autograd slice by
slice, `written-out` is what `taille distill` runs (`--teacher-cache`, or `--loss KIND` with a --teacher).
Both are timed side by side in one process, alternating, in bf16-mixed and fp32; the gradients are compared.

Run:  .venv/bin/python benchmarks/topk_loss.py [--k 32,128,512] [--live fkl,rkl,jsd] [--repeats 5]
Writes benchmarks/results/topk_loss.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from taille.distill.losses import LOGIT_ELEMENTS, LossConfig, _HeadLoss, _fused_value_and_grad, _objective

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", default="32,128,512")
    parser.add_argument("--live", default="fkl,rkl,jsd", help="losses against a live teacher's logits")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--positions", type=int, default=8 * 255)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=480)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    N, V, H = args.positions, args.vocab, args.hidden
    hidden, weight = torch.randn(N, H, generator=g) * 0.5, torch.randn(V, H, generator=g) * 0.05
    teacher = F.log_softmax(torch.randn(N, V, generator=g) * 3, -1)  # (N, V)
    targets, mask = torch.randint(0, V, (N,), generator=g), torch.ones(N)
    chunk = max(1, LOGIT_ELEMENTS["cpu"] // V)  # as distill_loss slices on a CPU
    t_hidden, t_weight = torch.randn(N, 576, generator=g) * 0.5, torch.randn(V, 576, generator=g) * 0.1
    cases = []
    for k in filter(None, args.k.split(",")):
        top_logp, top_idx = teacher.topk(int(k), dim=-1)
        rest = torch.log1p(-top_logp.double().exp().sum(-1)).float()
        cases.append((f"cache, K {k}", LossConfig(), None, None, (top_logp.half().float(), top_idx, rest)))
    for kind in filter(None, args.live.split(",")):
        cases.append((f"live, {kind}", LossConfig(kind), t_hidden, t_weight, None))
    rows = []
    for label, cfg, th, tw, top in cases:
        ways = {"autograd": None, "written-out": _fused_value_and_grad(cfg, targets, mask, th, tw, top)}
        loss = _objective(cfg, targets, mask, th, tw, top, None, None)
        for precision in ("bf16-mixed", "fp32"):
            seconds, grads = {name: [] for name in ways}, {}
            for _ in range(args.repeats + 1):  # the first round warms up
                for name, fast in ways.items():
                    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
                    start = time.perf_counter()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                        value = _HeadLoss.apply(h, w, loss, chunk, fast)
                    value.backward()
                    seconds[name].append(time.perf_counter() - start)
                    grads[name] = (value.detach(), w.grad)
            median = {name: sorted(s[1:])[len(s[1:]) // 2] for name, s in seconds.items()}
            (va, ga), (vb, gb) = grads["autograd"], grads["written-out"]
            rows.append({"teacher": label, "precision": precision, **{f"{n}_s": round(s, 4) for n, s in median.items()},
                         "speedup": round(median["autograd"] / median["written-out"], 2),
                         "loss_rel_diff": float((va - vb).abs() / va.abs()),
                         "grad_rel_diff": float((ga.float() - gb.float()).norm() / ga.float().norm())})
    lines = ["| teacher | precision | autograd (s) | written-out (s) | speed-up | loss rel. diff | head grad rel. diff |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['teacher']} | {r['precision']} | {r['autograd_s']} | {r['written-out_s']} | {r['speedup']}x | "
              f"{r['loss_rel_diff']:.1e} | {r['grad_rel_diff']:.1e} |" for r in rows]
    note = (f"{N} positions, vocabulary {V}, hidden {H}, random logits; median of {args.repeats} alternating rounds "
            f"after one warm-up, forward + backward of the sliced head loss ({chunk} rows a slice).")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "topk_loss.md").write_text("\n".join(lines) + "\n\n" + note + "\n")
    (RESULTS / "topk_loss.json").write_text(json.dumps({"rows": rows, "settings": vars(args)}, indent=1) + "\n")
    print("\n".join(lines) + "\n\n" + note)


if __name__ == "__main__":
    main()
