"""Research prototype that trained lumbar-column-refiner 1.0.0 (ai/weights/column-card.json).

Usage: extract OUT.pkl PHANTOM_DIR...  (coarse labels of lumbar-node phantom studies);
train OUT.pt STEPS A.pkl,B.pkl [INIT.pt]. The product module is ai/column_refine.py; this
script is kept so the shipped weights can be reproduced until `lumbar-node train --task
column` exists. Not part of the package, not linted."""
import sys, json, time, pickle, os
from pathlib import Path
import numpy as np
import torch
from torch.nn import functional as F
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ai.labels import Label
from ai.levels import split_blocks
from ai.canal_refine import patch_matrix, patch_coords, probs_to_native
from ai.model import UNet, UNetConfig

MM_PER_PX = 1.6
PX = 48
BOX_MM = 130.0
D, V = int(Label.DISC), int(Label.VERTEBRAL_BODY)


def column_centre(lab2d):
    m = (lab2d == D) | (lab2d == V)
    if m.sum() < 20:
        return None
    ys, xs = np.nonzero(m)
    return float(ys.mean()), float(xs.mean())


def sample(stack, coords, mode):
    """stack (m,h,w) float tensor-able, coords (2,n,n) native -> (m,n,n)."""
    h, w = stack.shape[-2:]
    gx = coords[1] / max(w - 1, 1) * 2 - 1
    gy = coords[0] / max(h - 1, 1) * 2 - 1
    grid = torch.from_numpy(np.stack([gx, gy], -1).astype(np.float32))[None]
    t = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[None]
    return F.grid_sample(t, grid, mode=mode, padding_mode="zeros" if mode == "nearest" else "border", align_corners=True)[0].numpy()


def signed(lab):
    return (lab == D).astype(np.float32) - (lab == V).astype(np.float32)


def build_input(imgs, labs, k, nb, coords):
    """imgs/labs: block arrays (n,h,w); k index in block; returns (8,PX,PX)."""
    idx = [k - 1, k, k + 1]
    present = [0 <= i < nb for i in idx]
    im = sample(np.stack([imgs[i] if p else imgs[k] for i, p in zip(idx, present)]), coords, "bilinear")
    lo, hi = np.percentile(im[1], [1, 99])
    sc = max(float(hi - lo), 1e-6)
    im = np.clip((im - lo) / sc, -0.5, 1.5)
    ms = sample(np.stack([signed(labs[i]) if p else np.zeros_like(labs[k], np.float32) for i, p in zip(idx, present)]), coords, "bilinear")
    for j, p in enumerate(present):
        if not p:
            im[j] = 0
    pres = np.stack([np.full((PX, PX), float(present[0]), np.float32), np.full((PX, PX), float(present[2]), np.float32)])
    return np.concatenate([im, ms, pres]).astype(np.float32)


def coarse_labels(an, volume):
    from ai.inference import pre_process, predict_native
    from ai.postprocess import post_process
    pre = pre_process(volume, an.card)
    raw = predict_native(an.model, pre, an.device, an.batch_size, an.autocast)
    labels, _ = post_process(raw.labels, volume)
    return labels, raw.disc_evidence


def extract(root, an):
    """Per block: native crops of images, coarse, truth, with spacing/orientation."""
    from node.commands.evaluate import phantom_cases
    out = []
    for case in phantom_cases(Path(root)):
        vol = case.volume
        coarse, _ = coarse_labels(an, vol)
        truth = case.truth_labels
        mode = Path(root).name
        for block in split_blocks(vol):
            cs = [column_centre(truth[k]) for k in block]
            cs = [c for c in cs if c is not None]
            if not cs:
                continue
            cy, cx = np.mean([c[0] for c in cs]), np.mean([c[1] for c in cs])
            hr, hc = BOX_MM / 2 / vol.pixel_spacing[0], BOX_MM / 2 / vol.pixel_spacing[1]
            r0, r1 = max(int(cy - hr), 0), min(int(cy + hr), vol.pixels.shape[1])
            c0, c1 = max(int(cx - hc), 0), min(int(cx + hc), vol.pixels.shape[2])
            out.append(dict(case=case.name, mode=mode, imgs=vol.pixels[block][:, r0:r1, c0:c1].astype(np.float16),
                            coarse=coarse[block][:, r0:r1, c0:c1].copy(), truth=truth[block][:, r0:r1, c0:c1].copy(),
                            spacing=vol.pixel_spacing, ori=vol.orientations[block[0]].copy()))
        print("extracted", case.name, flush=True)
    return out


def make_example(blk, k, rng, aug=True):
    imgs = blk["imgs"].astype(np.float32)
    labs = blk["coarse"]
    nb = len(imgs)
    c = column_centre(labs[k])
    if c is None:
        return None
    if aug:
        c = (c[0] + rng.normal(0, 4 / blk["spacing"][0]), c[1] + rng.normal(0, 4 / blk["spacing"][1]))
        m = patch_matrix(blk["spacing"], MM_PER_PX, blk["ori"], rotation_deg=float(rng.uniform(-15, 15)),
                         scale=float(rng.uniform(0.9, 1.1)), flip_lr=bool(rng.random() < 0.5))
    else:
        m = patch_matrix(blk["spacing"], MM_PER_PX, blk["ori"])
    coords = patch_coords(c, m, PX)
    if aug and rng.random() < 0.5:  # reverse slice order
        imgs, labs, truth, kk = imgs[::-1], labs[::-1], blk["truth"][::-1], nb - 1 - k
    else:
        truth, kk = blk["truth"], k
    x = build_input(imgs, labs, kk, nb, coords)
    if aug:
        g = float(np.exp(rng.normal(0, 0.2)))
        x[:3] = np.sign(x[:3]) * np.abs(x[:3]) ** g
        x[:3] += rng.normal(0, rng.uniform(0, 0.04), x[:3].shape).astype(np.float32)
    t = sample(truth[kk][None].astype(np.float32), coords, "nearest")[0].astype(np.int64)
    y = np.zeros_like(t)
    y[t == D] = 1
    y[t == V] = 2
    cm = sample(np.isin(labs[kk], (D, V))[None].astype(np.float32), coords, "nearest")[0] > 0
    w = np.where(cm | (y > 0), 1.0, 0.1).astype(np.float32)
    return x, y, w


def train(blocks, steps, out, seed=0, lr=2e-3, bs=32, init=None):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    items = [(b, k) for b, blk in enumerate(blocks) for k in range(len(blk["imgs"])) if column_centre(blk["coarse"][k]) is not None]
    # oversample slices where coarse identity is wrong
    wts = []
    for b, k in items:
        blk = blocks[b]
        cm = np.isin(blk["coarse"][k], (D, V))
        err = ((blk["coarse"][k] == D) & (blk["truth"][k] == V)) | ((blk["coarse"][k] == V) & (blk["truth"][k] == D))
        wts.append(4.0 if err.sum() > 0.1 * max(cm.sum(), 1) else 1.0)
    wts = np.array(wts) / np.sum(wts)
    print("items", len(items), "hard", int((np.array(wts) > wts.min() * 1.5).sum()), flush=True)
    net = UNet(UNetConfig(in_channels=8, num_classes=3, channels=(12, 24, 48, 64)))
    if init:
        net.load_state_dict(torch.load(init))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    run = 0.0
    for step in range(steps):
        xs, ys, ws = [], [], []
        while len(xs) < bs:
            b, k = items[rng.choice(len(items), p=wts)]
            ex = make_example(blocks[b], k, rng)
            if ex is None:
                continue
            xs.append(ex[0]); ys.append(ex[1]); ws.append(ex[2])
        x = torch.from_numpy(np.stack(xs)); y = torch.from_numpy(np.stack(ys)); w = torch.from_numpy(np.stack(ws))
        net.train()
        logits = net(x)
        loss = (F.cross_entropy(logits, y, reduction="none") * w).sum() / w.sum()
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        run = 0.98 * run + 0.02 * float(loss)
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step} loss {run:.4f} {time.time()-t0:.0f}s", flush=True)
            torch.save(net.state_dict(), out)
    return net


class ColumnRefiner:
    def __init__(self, path):
        self.net = UNet(UNetConfig(in_channels=8, num_classes=3, channels=(12, 24, 48, 64)))
        self.net.load_state_dict(torch.load(path))
        self.net.eval()

    def refine(self, labels, volume):
        out = labels.copy()
        for block in split_blocks(volume):
            imgs = volume.pixels[block]
            labs = labels[block]
            xs, todo = [], []
            for j, k in enumerate(block):
                c = column_centre(labs[j])
                if c is None:
                    continue
                m = patch_matrix(volume.pixel_spacing, MM_PER_PX, volume.orientations[k])
                xs.append(build_input(imgs, labs, j, len(block), patch_coords(c, m, PX)))
                todo.append((k, c, m))
            if not xs:
                continue
            with torch.inference_mode():
                p = torch.softmax(self.net(torch.from_numpy(np.stack(xs))), 1)
            for (k, c, m), pk in zip(todo, p):
                box, s, inside = probs_to_native(pk, labels[k].shape, c, m)
                sub = out[k][box]
                col = np.isin(labels[k][box], (D, V)) & inside
                new = np.where(s[1] >= s[2], D, V).astype(sub.dtype)
                sub[col] = new[col]
                out[k][box] = sub
        return out


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "extract":
        from ai.pipeline import Analyzer
        torch.set_num_threads(2)
        an = Analyzer(device="cpu", threads=2, refine=False)
        blocks = []
        for root in sys.argv[3:]:
            blocks += extract(root, an)
        pickle.dump(blocks, open(sys.argv[2], "wb"), protocol=4)
    elif cmd == "train":
        torch.set_num_threads(2)
        blocks = []
        for p in sys.argv[4].split(","):
            blocks += pickle.load(open(p, "rb"))
        train(blocks, int(sys.argv[3]), sys.argv[2], init=(sys.argv[5] if len(sys.argv) > 5 else None))
