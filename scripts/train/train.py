"""Trains hunyuan-tiny or hunyuan-tiny-draft (scripts/train/hunyuan.py) on the data written by
prepare.py and exports it in our checkpoint format.

Why it exists: hyserve needs small *trained* models of the real Hunyuan-Large architecture (a
target and a draft for speculative decoding) whose outputs mean something, plus the training
framework's own logits so the engine's numerics can be checked against an independent
implementation (check_logits.py).

    python3 scripts/train/train.py --data .dev/train/data \
        --preset tiny --out .dev/train/models/hunyuan-tiny --minutes 5          # GPU host
    ... --preset draft --device cpu --minutes 1 --batch 8 --seq 256              # CPU smoke test

Training: AdamW (betas 0.9/0.95, weight decay on matrices only), linear warmup then cosine decay
to --min-lr-frac of the peak, grad clip 1.0, bf16 autocast with fp32 master weights on CUDA (fp32
on CPU), random --seq-token windows of train.bin, loss = cross-entropy + --aux-coef * Switch
load-balancing loss, residual dropout --dropout (training only).

Time-bounded: a few calibration steps on a throwaway copy of the model time a step, one held-out
evaluation is timed, and the step count is then fixed so that the whole run (evals and export
included) ends within --minutes, and at most --max-epochs passes over train.bin; the LR schedule
spans that count. The ~3M-token corpus is small: on an H200 the epoch cap binds (tiny trains for
~1.5 minutes), because held-out loss climbs steeply once the model sees the data more than a few
times. --steps N instead fixes the count (fully reproducible on CPU for a given --seed).

Held-out perplexity (valid_plain.bin, valid_edit.bin, and the edit answers only) is measured over
non-overlapping windows covering each whole file, in eval mode with the weights rounded to bf16
(the exported values), at step 0, --evals times during training and at the end; the weights with
the best plain held-out loss are exported.

Output directory: config.json; model.safetensors (or model-0000i-of-0000n.safetensors shards, each
under 15 MiB, plus model.safetensors.index.json), bf16, our tensor names; hy.tiktoken and
tokenizer_config.json; training.json (hyperparameters, device, curve, perplexities); reference/
prompt_ids.json (first 64 tokens of valid_plain.bin), torch_logits_f32.npy and
torch_logits_bf16.npy (float32 [64, vocab]: the exported weights run by hunyuan.py in f32 and in
bf16 with the reference rounding points, eager attention, on the CPU).
"""

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hunyuan  # noqa: E402

DEFAULT_LR = {"tiny": 2e-3, "draft": 3e-3}
# The corpus (~3M training tokens) is small: one H200 could pass over it ~20 times in 5 minutes,
# and held-out loss climbs steeply after ~4 epochs without regularisation. Residual dropout plus
# an epoch cap (the LR schedule spans the capped count) gave the best held-out perplexity in a
# sweep on an H200 (scripts/train/sweep.sh; tiny: dropout 0/0.1/0.2/0.3 x 4/6/10 epochs, draft:
# dropout 0/0.1 x 4/8 epochs).
DEFAULT_DROPOUT = {"tiny": 0.2, "draft": 0.1}
DEFAULT_MAX_EPOCHS = {"tiny": 6.0, "draft": 8.0}


def log(msg):
    print(msg, flush=True)


def load_tokens(path):
    return torch.from_numpy(np.fromfile(path, dtype="<u2").astype(np.int64))


def answer_mask(ids, start_id, end_id):
    """Bool mask over targets: True for tokens inside an assistant reply (after <|extra_0|>, up to
    and including <|eos|>)."""
    mask = np.zeros(len(ids), dtype=bool)
    inside = False
    for i, t in enumerate(ids.tolist()):
        if inside:
            mask[i] = True
            if t == end_id:
                inside = False
        elif t == start_id:
            inside = True
    return torch.from_numpy(mask)


class Trainer:
    def __init__(self, args, model, device):
        self.args = args
        self.model = model
        self.device = device
        self.amp = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")
        self.opt = self.make_optimizer(model)

    def autocast(self):
        if self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def make_optimizer(self, model):
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.args.wd}, {"params": no_decay, "weight_decay": 0.0}]
        kw = {"fused": True} if self.device.type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=self.args.lr, betas=(0.9, 0.95), eps=1e-8, **kw)

    def step(self, model, opt, x, y, lr):
        for g in opt.param_groups:
            g["lr"] = lr
        with self.autocast():
            logits, aux = model(x)
            ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
            loss = ce + self.args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.args.clip)
        opt.step()
        return ce.detach(), aux.detach(), gnorm.detach()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def bf16_rounded(self):
        """Temporarily rounds every weight to bf16 (the values the export writes)."""
        saved = [p.detach().clone() for p in self.model.parameters()]
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(p.to(torch.bfloat16).to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.model.parameters(), saved):
                    p.copy_(s)

    @torch.no_grad()
    def evaluate(self, data, mask=None):
        """Mean loss over all targets of `data` (and over mask-selected targets), non-overlapping
        windows of --seq tokens covering the whole file."""
        seq, bs = self.args.seq, self.args.eval_batch
        n = data.numel()
        starts = list(range(0, n - 1, seq))
        full = [s for s in starts if s + seq + 1 <= n]
        part = [s for s in starts if s + seq + 1 > n]
        tot = torch.zeros((), dtype=torch.float64, device=self.device)
        tot_m = torch.zeros((), dtype=torch.float64, device=self.device)
        cnt, cnt_m = 0, 0
        self.model.eval()
        jobs = [full[i:i + bs] for i in range(0, len(full), bs)] + [[s] for s in part]
        for group in jobs:
            L = min(seq, n - 1 - group[0])
            idx = torch.tensor(group)[:, None] + torch.arange(L + 1)
            b = data[idx].to(self.device)
            with self.autocast():
                logits, _ = self.model(b[:, :-1])
            losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="none")
            tot += losses.double().sum()
            cnt += losses.numel()
            if mask is not None:
                m = mask[idx[:, 1:]].reshape(-1).to(self.device)
                tot_m += (losses.double() * m).sum()
                cnt_m += int(m.sum())
        self.model.train()
        out = {"loss": tot.item() / max(cnt, 1), "tokens": cnt}
        if mask is not None:
            out["answer_loss"] = tot_m.item() / max(cnt_m, 1)
            out["answer_tokens"] = cnt_m
        return out


def lr_at(step, total, warmup, peak, min_frac):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=".dev/train/data")
    ap.add_argument("--preset", choices=sorted(hunyuan.PRESETS), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget of the whole run")
    ap.add_argument("--steps", type=int, default=None, help="fixed step count (skips the time calibration)")
    ap.add_argument("--max-epochs", type=float, default=None,
                    help="cap the time-bounded step count at this many passes over train.bin "
                         "(default: tiny 6, draft 8; 0 = no cap)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="peak LR (default: tiny 2e-3, draft 3e-3)")
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=200, help="warmup steps (at most a tenth of the run)")
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--dropout", type=float, default=None,
                    help="residual dropout while training (default: tiny 0.2, draft 0.1)")
    ap.add_argument("--evals", type=int, default=10, help="held-out evaluations during training (plus step 0)")
    ap.add_argument("--eval-max-tokens", type=int, default=0,
                    help="evaluate only the first N tokens of each held-out file (smoke tests; 0 = all)")
    ap.add_argument("--calib-steps", type=int, default=6)
    ap.add_argument("--amp", choices=["auto", "bf16", "none"], default="auto",
                    help="bf16 autocast (auto: on CUDA only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--log-every-s", type=float, default=10.0)
    args = ap.parse_args()
    t_start = time.time()
    budget_s = args.minutes * 60.0
    if args.lr is None:
        args.lr = DEFAULT_LR[args.preset]
    if args.dropout is None:
        args.dropout = DEFAULT_DROPOUT[args.preset]
    if args.max_epochs is None:
        args.max_epochs = DEFAULT_MAX_EPOCHS[args.preset]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # -- data and model ------------------------------------------------------------------------
    tok_dir = os.path.join(args.data, "tokenizer")
    specials = hunyuan.read_special_ids(tok_dir)
    with open(os.path.join(args.data, "meta.json")) as f:
        data_meta = json.load(f)
    train = load_tokens(os.path.join(args.data, "train.bin")).to(device)
    valid_plain = load_tokens(os.path.join(args.data, "valid_plain.bin"))
    valid_edit = load_tokens(os.path.join(args.data, "valid_edit.bin"))
    if args.eval_max_tokens:
        valid_plain, valid_edit = valid_plain[:args.eval_max_tokens], valid_edit[:args.eval_max_tokens]
    edit_mask = answer_mask(valid_edit, specials["<|extra_0|>"], specials["<|eos|>"])
    n_train = train.numel()
    config = hunyuan.make_config(args.preset, specials)
    model = hunyuan.HunyuanForCausalLM(config)
    model.init_weights(args.seed)
    model.dropout = args.dropout
    model.to(device).train()
    n_params = model.num_parameters()
    d = model.dims
    tok_per_step = args.batch * args.seq
    log(f"[train] preset {args.preset}: {n_params:,} parameters; device {device_name(device)}; "
        f"train {n_train:,} tokens, held out {valid_plain.numel():,} plain + {valid_edit.numel():,} edit; "
        f"batch {args.batch} x {args.seq} = {tok_per_step} tokens/step; torch {torch.__version__}")
    trainer = Trainer(args, model, device)
    if device.type == "cuda":
        grouped = hunyuan._grouped_supported(device) and trainer.amp
        log(f"[train] expert GEMMs: {'grouped_mm (bf16)' if grouped else 'one matmul per expert'}")

    def batches(seed):
        g = torch.Generator(device="cpu").manual_seed(seed)
        ar = torch.arange(args.seq + 1)
        while True:
            starts = torch.randint(0, n_train - args.seq - 1, (args.batch,), generator=g)
            b = train[(starts[:, None] + ar).to(device)]
            yield b[:, :-1], b[:, 1:]

    # -- calibration (on a throwaway copy) and the first evaluation ----------------------------
    if args.steps is None:
        cmodel = copy.deepcopy(model)
        copt = trainer.make_optimizer(cmodel)
        cb = batches(args.seed + 10_000)
        for _ in range(2):  # warm-up (allocator, kernels)
            trainer.step(cmodel, copt, *next(cb), args.lr * 0.01)
        trainer.sync()
        t0 = time.time()
        for _ in range(args.calib_steps):
            trainer.step(cmodel, copt, *next(cb), args.lr * 0.01)
        trainer.sync()
        step_s = (time.time() - t0) / args.calib_steps
        del cmodel, copt
        log(f"[train] calibration: {step_s * 1000:.1f} ms/step ({tok_per_step / step_s:,.0f} tokens/s)")
    t0 = time.time()
    with trainer.bf16_rounded():
        ev_plain = trainer.evaluate(valid_plain)
        ev_edit = trainer.evaluate(valid_edit, edit_mask)
    eval_s = time.time() - t0
    evals = [{"step": 0, "plain_loss": ev_plain["loss"], "edit_loss": ev_edit["loss"],
              "edit_answer_loss": ev_edit["answer_loss"], "elapsed_s": round(time.time() - t_start, 1)}]
    log(f"[train] step 0 held-out ppl plain {math.exp(ev_plain['loss']):.1f} edit {math.exp(ev_edit['loss']):.1f} "
        f"(eval {eval_s:.1f}s)")
    if args.steps is None:
        reserve_s = 5.0 + eval_s  # export + reference logits + safety
        left = budget_s - (time.time() - t_start) - reserve_s - args.evals * eval_s
        total = max(10, int(left / step_s))
        if args.max_epochs:
            cap = max(10, math.ceil(args.max_epochs * n_train / tok_per_step))
            if cap < total:
                log(f"[train] {total} steps fit in the time budget; capped at {cap} ({args.max_epochs} epochs)")
                total = cap
    else:
        total = args.steps
    warmup = max(1, min(args.warmup, total // 10))
    eval_at = sorted({max(1, round(total * k / max(args.evals, 1))) for k in range(1, args.evals + 1)} | {total})
    log(f"[train] {total} steps ({total * tok_per_step / 1e6:.1f}M tokens, {total * tok_per_step / n_train:.1f} epochs), "
        f"warmup {warmup}, peak lr {args.lr}, evals at {eval_at}")

    # -- training ------------------------------------------------------------------------------
    best = {"plain_loss": ev_plain["loss"], "step": 0,
            "state": {k: v.detach().to("cpu", torch.bfloat16).clone() for k, v in model.state_dict().items()},
            "edit_loss": ev_edit["loss"], "edit_answer_loss": ev_edit["answer_loss"]}
    curve = []
    data_iter = batches(args.seed + 1)
    t_train = time.time()
    t_log = t_train
    acc_ce = torch.zeros((), device=device)
    acc_aux = torch.zeros((), device=device)
    acc_n, step, stopped_early = 0, 0, False
    for step in range(1, total + 1):
        lr = lr_at(step - 1, total, warmup, args.lr, args.min_lr_frac)
        ce, aux, gnorm = trainer.step(model, trainer.opt, *next(data_iter), lr)
        acc_ce += ce
        acc_aux += aux
        acc_n += 1
        now = time.time()
        if now - t_log >= args.log_every_s or step == total or step in eval_at:
            ce_v, aux_v, gn = acc_ce.item() / acc_n, acc_aux.item() / acc_n, gnorm.item()
            now = time.time()
            rate = step * tok_per_step / (now - t_train)
            eta = (total - step) * (now - t_train) / step
            log(f"[train] step {step}/{total} loss {ce_v:.4f} aux {aux_v:.4f} gnorm {gn:.2f} lr {lr:.2e} "
                f"{rate:,.0f} tok/s elapsed {now - t_start:.0f}s eta {eta:.0f}s")
            curve.append({"step": step, "loss": round(ce_v, 5), "aux": round(aux_v, 5), "lr": lr,
                          "elapsed_s": round(now - t_start, 1)})
            acc_ce.zero_()
            acc_aux.zero_()
            acc_n, t_log = 0, now
        if step in eval_at:
            with trainer.bf16_rounded():
                ev_plain = trainer.evaluate(valid_plain)
                ev_edit = trainer.evaluate(valid_edit, edit_mask)
                rec = {"step": step, "plain_loss": ev_plain["loss"], "edit_loss": ev_edit["loss"],
                       "edit_answer_loss": ev_edit["answer_loss"], "elapsed_s": round(time.time() - t_start, 1)}
                evals.append(rec)
                improved = ev_plain["loss"] < best["plain_loss"]
                if improved:
                    best = {"plain_loss": ev_plain["loss"], "edit_loss": ev_edit["loss"],
                            "edit_answer_loss": ev_edit["answer_loss"], "step": step,
                            "state": {k: v.detach().to("cpu", torch.bfloat16).clone()
                                      for k, v in model.state_dict().items()}}
            log(f"[train] eval step {step}: held-out ppl plain {math.exp(rec['plain_loss']):.2f} "
                f"edit {math.exp(rec['edit_loss']):.2f} (answers {math.exp(rec['edit_answer_loss']):.2f})"
                f"{' *best' if improved else ''}")
        if args.steps is None and time.time() - t_start > budget_s + 30 and step < total:
            log(f"[train] over the time budget at step {step}: stopping early")
            stopped_early = True
            break
    steps_done = step
    train_s = time.time() - t_train

    # -- export --------------------------------------------------------------------------------
    ppl = {"plain": math.exp(best["plain_loss"]), "edit": math.exp(best["edit_loss"]),
           "edit_answers": math.exp(best["edit_answer_loss"])}
    tokens_seen = steps_done * tok_per_step
    training_meta = {
        "preset": args.preset,
        "name": hunyuan.MODEL_NAMES[args.preset],
        "corpus": f"King James Bible ({data_meta['corpus']}, sha256 {data_meta['corpus_sha256']})",
        "split_rule": data_meta["split_rule"],
        "steps": steps_done,
        "best_step": best["step"],
        "tokens_seen": tokens_seen,
        "heldout_ppl_plain": round(ppl["plain"], 4),
        "heldout_ppl_edit": round(ppl["edit"], 4),
        "heldout_ppl_edit_answers": round(ppl["edit_answers"], 4),
        "seed": args.seed,
    }
    config = hunyuan.make_config(args.preset, specials, training=training_meta)
    if os.path.isdir(args.out):
        for fn in os.listdir(args.out):  # drop stale shards of an earlier export
            if fn.startswith("model") and (fn.endswith(".safetensors") or fn.endswith(".json")):
                os.remove(os.path.join(args.out, fn))
    files = hunyuan.export_checkpoint(best["state"], config, args.out)
    for fn in ("hy.tiktoken", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(tok_dir, fn), os.path.join(args.out, fn))

    ref_dir = os.path.join(args.out, "reference")
    os.makedirs(ref_dir, exist_ok=True)
    prompt = valid_plain[:64]
    with open(os.path.join(ref_dir, "prompt_ids.json"), "w") as f:
        json.dump({"prompt_ids": prompt.tolist(), "source": "valid_plain.bin tokens 0..63"}, f)
        f.write("\n")
    for dtype, fn in ((torch.float32, "torch_logits_f32.npy"), (torch.bfloat16, "torch_logits_bf16.npy")):
        ref = hunyuan.load_model(args.out, dtype=dtype, device="cpu")
        with torch.no_grad():
            logits, _ = ref(prompt[None], exact=True)
        np.save(os.path.join(ref_dir, fn), logits[0].numpy().astype(np.float32))
    del ref

    wall_s = time.time() - t_start
    info = {
        "name": hunyuan.MODEL_NAMES[args.preset],
        "preset": args.preset,
        "parameters": n_params,
        "active_parameters_per_token": n_params - d.layers * (d.experts - 1) * 3 * d.hidden * d.inter,
        "hyperparameters": {k: v for k, v in vars(args).items()} | {
            "total_steps": total, "warmup_steps": warmup, "tokens_per_step": tok_per_step,
            "optimizer": "AdamW(betas=(0.9, 0.95), eps=1e-8), decay on matrices only",
            "schedule": "linear warmup, cosine to min_lr_frac * lr", "precision": "bf16 autocast" if trainer.amp else "fp32"},
        "device": device_name(device),
        "torch": torch.__version__,
        "wall_time_s": round(wall_s, 1),
        "train_time_s": round(train_s, 1),
        "steps": steps_done,
        "stopped_early": stopped_early,
        "tokens_seen": tokens_seen,
        "epochs": round(tokens_seen / n_train, 3),
        "best_step": best["step"],
        "heldout_ppl": ppl,
        "heldout_loss": {"plain": best["plain_loss"], "edit": best["edit_loss"], "edit_answers": best["edit_answer_loss"]},
        "evals": evals,
        "loss_curve": curve,
        "data": {"train_tokens": n_train, "valid_plain_tokens": valid_plain.numel(),
                 "valid_edit_tokens": valid_edit.numel(), "corpus_sha256": data_meta["corpus_sha256"]},
        "files": files,
    }
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    log(f"[train] exported {args.out}: {', '.join(files)}; best step {best['step']}, held-out ppl plain "
        f"{ppl['plain']:.2f} edit {ppl['edit']:.2f} (answers {ppl['edit_answers']:.2f}); "
        f"{steps_done} steps, {tokens_seen / 1e6:.1f}M tokens, wall {wall_s:.0f}s")


if __name__ == "__main__":
    main()
