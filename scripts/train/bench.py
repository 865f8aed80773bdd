"""Device check and step-time benchmark for scripts/train (run it on the GPU host before training).

Why it exists: the training host cannot be debugged interactively, so this checks, on the device
that will train, that (1) the expert dispatch paths (F.grouped_mm and per-expert matmuls) agree,
(2) the device's f32 and bf16 reference forward passes match the CPU's, and (3) how long a training
step takes per preset and batch size (to size --batch and predict the run).

    python3 scripts/train/bench.py [--device cuda] [--batches 16,32,64]
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hunyuan  # noqa: E402

SPECIALS = {"<|bos|>": 4098, "<|eos|>": 4099, "<|pad|>": 4100}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_numerics(device):
    torch.manual_seed(0)
    for preset in ("draft", "tiny"):
        m = hunyuan.HunyuanForCausalLM(hunyuan.make_config(preset, SPECIALS))
        m.init_weights(0)
        with torch.no_grad():
            for layer in m.model.layers:  # sharpen the router so that experts differ
                layer.mlp.gate.wg.weight.mul_(20)
            for p in m.parameters():  # bf16 values, like an exported checkpoint
                p.copy_(p.bfloat16().float())
        ids = torch.randint(0, 4305, (1, 96))
        with torch.no_grad():
            cpu32, _ = m.eval()(ids, exact=True)
            cpu16, _ = m.to(torch.bfloat16)(ids, exact=True)
            m.float()
            dev = m.to(device)
            d32, _ = dev(ids.to(device), exact=True)
            d16, _ = dev.to(torch.bfloat16)(ids.to(device), exact=True)
            dev.float()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                amp, _ = dev(ids.to(device), exact=False)
        print(f"[bench] {preset}: {device} f32 vs cpu f32 {rel(d32.cpu(), cpu32):.2e}; {device} bf16 vs cpu bf16 "
              f"{rel(d16.cpu(), cpu16):.2e}; cpu bf16 vs f32 {rel(cpu16, cpu32):.2e}; "
              f"training autocast (sdpa) vs f32 {rel(amp.cpu(), cpu32):.2e}", flush=True)


def bench(device, preset, batch, seq, grouped, steps=10):
    dev = torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else device
    use = grouped and hunyuan._grouped_supported(dev)
    hunyuan._GROUPED_OK[str(dev)] = use
    m = hunyuan.HunyuanForCausalLM(hunyuan.make_config(preset, SPECIALS))
    m.init_weights(0)
    m.to(device).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=device.type == "cuda")
    ids = torch.randint(0, 4305, (batch, seq + 1), device=device)
    amp = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits, aux = m(ids[:, :-1])
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)) + 0.01 * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()

    for _ in range(3):
        step()
    sync(device)
    t = time.time()
    for _ in range(steps):
        step()
    sync(device)
    dt = (time.time() - t) / steps
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    print(f"[bench] {preset:<5} batch {batch:>3} x {seq}: {dt * 1000:7.1f} ms/step, {batch * seq / dt:>10,.0f} tok/s"
          f" ({'grouped_mm' if use else 'per-expert'}; peak mem {mem:.1f} GiB)", flush=True)
    return dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="16,32,64")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--presets", default="draft,tiny")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"[bench] torch {torch.__version__}, device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    if device.type == "cuda":
        print(f"[bench] grouped_mm self-test: {hunyuan._grouped_supported(device)}", flush=True)
    check_numerics(device)
    for preset in args.presets.split(","):
        for b in map(int, args.batches.split(",")):
            bench(device, preset, b, args.seq, grouped=True)
        if device.type == "cuda":
            bench(device, preset, 32, args.seq, grouped=False)
            hunyuan._GROUPED_OK.clear()


if __name__ == "__main__":
    main()
