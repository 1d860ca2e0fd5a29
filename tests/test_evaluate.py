"""training/evaluate.py and the node's sigma window in training/sparsity.py: the validation set is held out and
fixed, its loss deterministic and independent of the batch, BSA that keeps everything equals dense; sampling
runs BSA only inside start_percent..end_percent; PSNR and strips; bench/bench_trained.py --cpu-smoke runs."""
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from comfy_env import require_comfyui

from comfyui_bsa.bsa_core.config import BSAConfig
from comfyui_bsa.training import TrainConfig, data
from comfyui_bsa.training.evaluate import psnr, psnr_per_video, strip_image, validation_loss, validation_set
from comfyui_bsa.training.model import initial_state_dict, sample_euler, sampling_sigmas

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = pathlib.Path(__file__).resolve().parents[1]
EVERYTHING = BSAConfig(cube_size=(2, 2, 2), keep_ratio=1.0, kv_threshold=1.0, threshold_mode="cumulative")
SPARSE = BSAConfig(cube_size=(2, 2, 2), keep_ratio=0.5, stat_lambda=1.0)


def small_config(**changes) -> TrainConfig:
    """4 latent frames of 8x8: a 4x4x4 token grid, 8 cubes of 2x2x2."""
    return TrainConfig(**{"run_dir": "unused", "frames": 4, "latent_size": 8, "text_tokens": 4, **changes})


@pytest.fixture(scope="module")
def model():
    require_comfyui()
    from comfyui_bsa.training.model import wan_from_state_dict
    return wan_from_state_dict(initial_state_dict(256, 2, 512, seed=0)).requires_grad_(False)


def test_validation_set_is_other_videos_with_the_training_captions_and_fixed():
    config = small_config(seed=3)
    vset = validation_set(config, num_videos=4, num_sigmas=3)
    again = validation_set(config, num_videos=4, num_sigmas=3)
    assert all(torch.equal(getattr(vset, f), getattr(again, f)) for f in ("x0", "context", "class_ids", "sigmas", "noise"))
    assert vset.x0.shape == (4, 16, 4, 8, 8) and vset.noise.shape == (4, 3, 16, 4, 8, 8) and len(vset) == 12
    training = data.SyntheticVideos(4, 8, 1000, 4, seed=3)
    assert torch.equal(vset.context, training.embeddings[vset.class_ids])  # what the model learnt per caption
    training_latents = data.encode(training.render(range(1000)))
    for video in vset.x0:  # none of the first 1000 training videos
        assert (training_latents - video).flatten(1).abs().amax(1).min() > 1e-3
    u = (torch.arange(3) + 0.5) / 3
    assert torch.allclose(vset.sigmas, 3 * u / (1 + 2 * u))  # the midpoints of u's bins, shifted as in training
    with pytest.raises(ValueError, match="training seed"):
        validation_set(config, seed=3)


def test_validation_loss_is_deterministic_batch_free_and_dense_under_bsa_that_keeps_everything(model):
    vset = validation_set(small_config(), num_videos=3, num_sigmas=2)
    dense = validation_loss(model, vset, batch_size=4)
    assert dense.kept_kv_pct is None and dense.per_sigma.shape == (2,)
    assert validation_loss(model, vset, batch_size=4).loss == dense.loss  # same model, same setting: same number
    assert validation_loss(model, vset, batch_size=1).loss == pytest.approx(dense.loss, rel=1e-6)
    assert dense.loss == pytest.approx(float(dense.per_sigma.mean()), rel=1e-6)
    everything = validation_loss(model, vset, EVERYTHING, batch_size=4)
    assert everything.kept_kv_pct == 100.0 and everything.loss == pytest.approx(dense.loss, rel=1e-5)
    sparse = validation_loss(model, vset, SPARSE, batch_size=4)
    again = validation_loss(model, vset, SPARSE, batch_size=4)
    assert (again.loss, again.kept_kv_pct) == (sparse.loss, sparse.kept_kv_pct)
    one_batch = validation_loss(model, vset, SPARSE, batch_size=6)  # 6 pairs; 4 + 2 above, and 5 + 1 here
    assert sparse.kept_kv_pct == pytest.approx(one_batch.kept_kv_pct)
    assert validation_loss(model, vset, SPARSE, batch_size=5).kept_kv_pct == pytest.approx(one_batch.kept_kv_pct)
    assert 0 < sparse.kept_kv_pct < 100 and sparse.loss != dense.loss and math.isfinite(sparse.loss)
    assert validation_loss(model, vset, SPARSE, dense_blocks="0,1").kept_kv_pct is None  # every block dense


def test_sampling_is_sparse_only_inside_the_node_window(model):
    from comfyui_bsa.training.sparsity import sampling_attention, sparse_steps

    sigmas = sampling_sigmas(10, 3.0)
    assert sparse_steps(sigmas, 3.0, 0.2, 1.0) == [False] * 2 + [True] * 8  # step 2 of 10 sits on the boundary
    assert sparse_steps(sigmas, 3.0, 0.0, 0.5) == [True] * 6 + [False] * 4
    assert sparse_steps(sigmas, 3.0) == [True] * 10

    sigmas = sampling_sigmas(5, 3.0)  # steps 1..4 sparse at start_percent 0.2
    noise = torch.randn(1, 16, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = data.SyntheticVideos(4, 8, 1, 4).embeddings[:1]
    dense = sample_euler(model, noise, context, sigmas)
    options_at, run = sampling_attention(SPARSE, model, noise.shape, 4, sigmas, 3.0, start_percent=0.2)
    sparse = sample_euler(model, noise, context, sigmas, options_at)
    stats = run.stats.as_dict()
    assert stats["sparse_calls"] == 4 * 2  # sparse steps x blocks
    assert stats["dense_reasons"] == {"sigma outside start_percent..end_percent": 2, "cross-attention": 10}
    assert not torch.equal(sparse, dense)
    options_at, run = sampling_attention(EVERYTHING, model, noise.shape, 4, sigmas, 3.0, start_percent=0.2)
    assert torch.allclose(sample_euler(model, noise, context, sigmas, options_at), dense, rtol=1e-4, atol=1e-4)
    assert sampling_attention(None, model, noise.shape, 4, sigmas, 3.0)[0](0) == {}


def test_psnr_and_strip():
    import numpy
    from PIL import Image

    video = torch.rand(3, 2, 4, 6) * 2 - 1
    assert psnr(video, video) == math.inf
    shifted = (video * 0.5 + 0.1).clamp(-1, 1)
    assert psnr(shifted, shifted + 0.1) == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-4)
    assert psnr(video * 3, video.clamp(-1, 1) * 3) == math.inf  # both clipped to [-1, 1]: as shown
    videos, references = torch.stack([video, shifted, video * 3]), torch.stack([video, shifted + 0.1, video * 2])
    per_video = psnr_per_video(videos, references)
    assert per_video.shape == (3,) and per_video[0] == math.inf
    assert per_video[1:].tolist() == pytest.approx([psnr(a, b) for a, b in zip(videos[1:], references[1:])], rel=1e-5)
    image = strip_image([("dense", video), ("bsa", -video)])
    assert isinstance(image, Image.Image) and image.height == 2 * 4 and image.width > 2 * 6
    right = torch.from_numpy(numpy.array(image.crop((image.width - 12, 0, image.width, 4)))).float().reshape(-1, 3)
    expected = ((video.clamp(-1, 1) + 1) * 127.5).round().permute(2, 1, 3, 0).reshape(-1, 3)  # frames side by side
    assert torch.equal(right, expected)
    with pytest.raises(ValueError, match="bsa"):
        strip_image([("dense", video), ("bsa", video[:, :1])])


def test_bench_trained_cpu_smoke_runs_and_writes_its_table_and_strips(tmp_path):
    from comfy_env import COMFYUI_PATH
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_trained.py"), "--cpu-smoke", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COMFYUI_PATH": str(COMFYUI_PATH), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    table = (tmp_path / "bench_trained.txt").read_text()
    assert table.startswith("device: CPU") and "validation loss" in table
    for row in ("defaults (stat λ1)", "stat λ1.5", "stat λ2", "keep 0.5 stat λ1", "cum 0.9", "trained (keep 0.5"):
        assert row in table, row
    assert "sol_attn: skipped (" in table
    bsa_models = 3  # scratch, finetune, distill; per model 2 validation rows and 3 sample rows
    assert len([line for line in table.splitlines() if line.strip().startswith("bsa_")]) == bsa_models * (2 + 3)
    for row in ("stat λ1 no pool", "nearly every cube (cum 0.9999)"):  # the pooled remainder's share, the floor
        assert row in table, row
    strips = sorted(tmp_path.glob("strip_*.png"))
    assert [p.name for p in strips] == ["strip_0_red_disc.png", "strip_1_green_square.png"]
