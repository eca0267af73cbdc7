"""ADViT (models/advit.py, train_advit.py): each part against a direct computation of what the released code
(zsgyj1996/ADViT) or the Anomaly Transformer computes, the minimax phases' gradients, a tiny run that detects
the synthetic defects, and a bit-identical resume."""
import math

import numpy as np
import pytest
import torch

import train_advit
from conftest import run_in_process
from models.advit import (ADViT, DigitCaps, MixtureDensity, association_losses, discrepancy, gaussian_prior,
                          kl_per_patch, patch_nll, ssim)
from utils.checkpoint import load_checkpoint
from utils.config import ConfigError, load_config, validate

TINY = dict(image_size=64, crop_size=64, patch_size=16, vit_dim=32, vit_depth=2, vit_heads=2, vit_mlp=64,
            mdn_gaussians=3, decoder_layers=[[16, 4, 2, 1], [8, 4, 2, 1], [3, 4, 2, 1]], epochs=0, map_size=64)


def tiny_cfg(**overrides) -> dict:
    with train_advit.advit_keys():
        cfg = load_config(train_advit.SETTINGS.parent / "mvtec_advit.yaml")
        return validate({**cfg, **TINY, **overrides}, "test", note=lambda _: None)


def tiny_args(data, out, **overrides) -> list[str]:
    args = {"dataset": "folder", "data_path": data, "device": "cpu", "num_workers": 0, "output_dir": out,
            "run_name": "run", "classes": "stripes", **TINY, **overrides}
    return [item for key, value in args.items() for item in (f"--{key}", str(value))]


def squash(s: np.ndarray) -> np.ndarray:
    norm2 = (s ** 2).sum()
    return norm2 / (1 + norm2) * s / math.sqrt(norm2)


def test_capsule_routing_is_three_iterations_of_dynamic_routing():
    """Dynamic routing written out capsule by capsule (3 iterations, coupling = softmax over the output
    capsules, agreement update from the detached predictions, the longest output passed on). With the
    released single output capsule the coupling is always 1: the result is squash(sum_i W_i x_i)."""
    torch.manual_seed(0)
    for out_caps in (3, 1):
        caps = DigitCaps(in_caps=5, out_caps=out_caps, out_dim=4).double()
        x = torch.randn(2, 5, 8, dtype=torch.float64)
        W = caps.W.detach().numpy()
        for b in range(2):
            u = np.einsum("jidk,ik->jid", W, x[b].numpy())  # prediction of output j from input i
            logits = np.zeros((out_caps, 5))
            for _ in range(3):
                c = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
                v = np.stack([squash((c[j][:, None] * u[j]).sum(0)) for j in range(out_caps)])
                logits = logits + np.einsum("jid,jd->ji", u, v)
            expected = v[np.argmax(np.linalg.norm(v, axis=1))]
            np.testing.assert_allclose(caps(x)[b].detach().numpy(), expected, rtol=1e-10)
        if out_caps == 1:
            direct = squash(np.einsum("idk,ik->d", W[0], x[0].numpy()))
            np.testing.assert_allclose(caps(x)[0].detach().numpy(), direct, rtol=1e-10)


def test_mdn_likelihood_is_the_released_weighted_sum_not_a_mixture_log_likelihood():
    torch.manual_seed(0)
    mdn = MixtureDensity(dim=4, gaussians=3).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    pi, mu, logvar = mdn(x)
    clamped = x.clamp(min=np.finfo(float).eps)  # the MDN reads its input clamped at machine eps
    torch.testing.assert_close(mu, (clamped @ mdn.mu.weight.t()).view(2, 5, 4, 3))
    ours = patch_nll(x, pi, mu, logvar)
    for b in range(2):
        for n in range(5):
            xs, p, m, lv = x[b, n].numpy(), pi[b, n].detach().numpy(), mu[b, n].detach().numpy(), logvar[b, n].detach().numpy()
            per_gaussian = [0.5 * (math.log(2 * math.pi) + sum(lv[d, k] + (xs[d] - m[d, k]) ** 2 / math.exp(lv[d, k])
                                                                for d in range(4))) for k in range(3)]
            assert ours[b, n].item() == pytest.approx(sum(p[k] * per_gaussian[k] for k in range(3)), rel=1e-12)
            # the quirk: a proper mixture NLL, -log sum_k pi_k N(x; mu_k, exp(logvar_k)), is another number
            log_n = [-0.5 * sum(math.log(2 * math.pi) + lv[d, k] + (xs[d] - m[d, k]) ** 2 / math.exp(lv[d, k])
                                for d in range(4)) for k in range(3)]
            mixture = -math.log(sum(p[k] * math.exp(log_n[k]) for k in range(3)))
            assert abs(ours[b, n].item() - mixture) > 1e-3


def test_ssim_is_pytorch_ssim_window_11_sigma_1_5():
    torch.manual_seed(0)
    a, b = torch.rand(1, 2, 14, 14, dtype=torch.float64), torch.rand(1, 2, 14, 14, dtype=torch.float64)
    g = np.exp(-(np.arange(11) - 5) ** 2 / (2 * 1.5 ** 2))
    window = np.outer(g / g.sum(), g / g.sum())
    pad = lambda t: np.pad(t, 5)  # zero padding, as conv2d(padding=5)
    values = []
    for ch in range(2):
        x, y = pad(a[0, ch].numpy()), pad(b[0, ch].numpy())
        for i in range(14):
            for j in range(14):
                wx, wy = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
                mx, my = (window * wx).sum(), (window * wy).sum()
                vx, vy = (window * wx * wx).sum() - mx ** 2, (window * wy * wy).sum() - my ** 2
                cxy = (window * wx * wy).sum() - mx * my
                values.append((2 * mx * my + 1e-4) * (2 * cxy + 9e-4) / ((mx ** 2 + my ** 2 + 1e-4) * (vx + vy + 9e-4)))
    assert ssim(a, b).item() == pytest.approx(np.mean(values), rel=1e-6)  # the window is float32, as released
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-6)


def test_prior_is_a_row_normalised_gaussian_of_the_grid_distance_and_discrepancy_a_symmetric_kl():
    torch.manual_seed(0)
    grid, heads = 3, 2
    logits = torch.randn(1, grid * grid, heads, dtype=torch.float64)
    points = [(r, c) for r in range(grid) for c in range(grid)]
    distances = torch.tensor([[math.dist(p, q) for q in points] for p in points], dtype=torch.float64)
    prior = gaussian_prior(logits, distances)
    for h in range(heads):
        for i in range(grid * grid):
            sigma = 3 ** (1 / (1 + math.exp(-5 * logits[0, i, h].item())) + 1e-5) - 1
            kernel = [math.exp(-distances[i, j].item() ** 2 / (2 * sigma ** 2)) for j in range(grid * grid)]
            np.testing.assert_allclose(prior[0, h, i].numpy(), np.array(kernel) / sum(kernel), rtol=1e-10)
    series = torch.softmax(torch.randn(1, heads, grid * grid, grid * grid, dtype=torch.float64), dim=-1)
    kl = lambda p, q: (p * (np.log(p + 1e-4) - np.log(q + 1e-4))).sum()
    s, p = series.numpy(), prior.numpy()
    for i in range(grid * grid):
        expected = np.mean([kl(s[0, h, i], p[0, h, i]) for h in range(heads)])
        assert kl_per_patch(series, prior)[0, i].item() == pytest.approx(expected, rel=1e-10)
        symmetric = np.mean([kl(s[0, h, i], p[0, h, i]) + kl(p[0, h, i], s[0, h, i]) for h in range(heads)])
        assert discrepancy([(series, prior)] * 2, 50.0)[0, i].item() == pytest.approx(2 * 50 * symmetric, rel=1e-10)


def test_minimax_phases_move_only_their_side():
    """Phase 1 (maximise series_loss: prior detached) reaches the attention, never the prior's widths;
    phase 2 (minimise prior_loss: series detached) reaches the widths (and the layers feeding them), never
    the attention's projections; train_step adds the two phases' gradients as solver.py's two backward calls."""
    cfg = tiny_cfg(association="discrepancy", noise_sd=0.0)
    torch.manual_seed(0)
    model = ADViT(cfg).double()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}
    series_loss, _ = association_losses(model(images)[3])
    phase1 = grads(-series_loss)
    assert all(phase1[n] is None or not phase1[n].any() for n in phase1 if ".attn.sigma." in n)
    assert phase1["vit.blocks.1.attn.to_qkv.weight"].abs().sum() > 0
    _, prior_loss = association_losses(model(images)[3])
    phase2 = grads(prior_loss)
    assert all(phase2[n].abs().sum() > 0 for n in phase2 if ".attn.sigma.weight" in n)
    after_last_prior = ("caps.", "decoder.", "mdn.", "vit.blocks.1.attn.to_out.", "vit.blocks.1.mlp.", "vit.blocks.1.norm2.")
    assert all(phase2[n] is None for n in phase2 if n.startswith(after_last_prior))
    assert phase2["vit.blocks.1.attn.to_qkv.weight"] is None or not phase2["vit.blocks.1.attn.to_qkv.weight"].any()

    loss, associations = train_advit.advit_loss(model, images, cfg)
    series_loss, prior_loss = association_losses(associations)
    model.zero_grad(set_to_none=True)
    (loss - 3.0 * series_loss).backward(retain_graph=True)  # solver.py: loss1.backward(retain_graph=True)
    (loss + 3.0 * prior_loss).backward()                     # loss2.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer = train_advit.build_optimizer(model, {**cfg, "lr": 0.0})
    train_advit.train_step(model, optimizer, images, cfg)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-9)


def test_advit_keys_exist_only_for_train_advit(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown config key 'association'"):
        validate({"association": "none"})
    result = run_in_process(train_advit, tiny_args(tmp_path, tmp_path / "out", decoder_layers=[[3, 4, 2, 1]]), capsys)
    assert result.returncode == 1 and "decoder_layers make 16 x 16 images" in result.stderr
    result = run_in_process(train_advit, tiny_args(tmp_path, tmp_path / "out", association="both"), capsys)
    assert result.returncode == 1 and "'association' must be one of none, discrepancy" in result.stderr


def test_tiny_advit_detects_the_synthetic_defects(synthetic_data, tmp_path, capsys):
    """20 epochs (80 steps) on one class at lr 1e-2 (the released 1e-4 needs hundreds of epochs), an 8 x 8
    grid as released. With 8 normal and 12 defective test images, an I-AUROC of 0.75 or more has a chance
    of about 3% for a scorer that knows nothing (Mann-Whitney, normal approximation); the pixel AUROC over
    20 x 64 x 64 pixels must show the localisation too."""
    args = tiny_args(synthetic_data, tmp_path, patch_size=8, lr=1e-2, epochs=20)
    result = run_in_process(train_advit, args, capsys)
    assert result.returncode == 0, result.stderr
    with train_advit.advit_keys():
        row = load_checkpoint(tmp_path / "run" / "stripes" / "checkpoint.pth")["results"]["stripes"]
    assert row["I-AUROC"] >= 0.75 and row["P-AUROC"] >= 0.8, row
    assert "kept the weights of epoch" in (tmp_path / "run" / "log.txt").read_text()
    assert not (tmp_path / "run" / "stripes" / "best.pth").exists()


class StopAfter(train_advit.StopRequest):
    """A SIGTERM that arrives after `steps` training steps."""
    steps = 0

    def requested(self) -> bool:
        StopAfter.steps -= 1
        return StopAfter.steps == 0


def test_interrupted_advit_resumes_bit_identical(synthetic_data, tmp_path, capsys, monkeypatch):
    """Two epochs of 2 steps with the best-epoch selection and the association discrepancy; stopped after
    step 3 (the first epoch's weights already kept), resumed, equal to the straight run in every weight."""
    args = lambda out: tiny_args(synthetic_data, out, epochs=2, batch_size=16, ckpt_every=0, association="discrepancy")
    assert run_in_process(train_advit, args(tmp_path / "straight"), capsys).returncode == 0
    StopAfter.steps = 3
    monkeypatch.setattr(train_advit, "StopRequest", StopAfter)
    assert run_in_process(train_advit, args(tmp_path / "cut"), capsys).returncode == 143
    with train_advit.advit_keys():
        interrupted = load_checkpoint(tmp_path / "cut" / "run" / "stripes" / "checkpoint.pth")
    assert interrupted["step"] == 3 and not interrupted["finished"]
    monkeypatch.undo()
    assert run_in_process(train_advit, ["--resume", tmp_path / "cut" / "run"], capsys).returncode == 0
    straight = torch.load(tmp_path / "straight" / "run" / "stripes" / "checkpoint.pth", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "run" / "stripes" / "checkpoint.pth", weights_only=True)
    assert straight["model"].keys() == resumed["model"].keys()
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    assert (tmp_path / "straight" / "run" / "results.csv").read_text() == (tmp_path / "cut" / "run" / "results.csv").read_text()
