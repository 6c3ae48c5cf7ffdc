"""On a CUDA device: a model served through the supervisor, with allocator telemetry.

Skipped without CUDA. `QVL_GPU_MODEL` names the model folder (the `qwen3-vl-4b` preset on a lent
GPU); without it the tiny model is used.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import ROOT, SupervisorProcess, png, wait_gone

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    if os.environ.get("QVL_GPU_MODEL"):
        return Path(os.environ["QVL_GPU_MODEL"])
    out = tmp_path_factory.mktemp("gpu") / "tiny"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_model.py"), "--preset", "tiny",
                    "--out", str(out)], check=True)
    return out


@pytest.mark.timeout(600)
def test_served_on_cuda_with_allocator_telemetry(tmp_path, gpu_model):
    # a later --device overrides the harness's cpu default
    sup = SupervisorProcess(tmp_path, gpu_model, "--device", "cuda:0", "--start-timeout-s", "300")
    try:
        status = sup.wait_ready(timeout=300)
        with sup.client(timeout=120) as client:
            result = client.ask(png((448, 448)), "What is in this picture?",
                                max_new_tokens=16, min_new_tokens=16)
            status = client.status()
        assert result.usage["completion_tokens"] == 16
        telemetry = status["workers"][0]["telemetry"]
        print("answer:", repr(result.text), "timings:", result.timings)
        print("telemetry:", telemetry)
        assert telemetry["allocated_bytes"] > 0
        assert telemetry["reserved_bytes"] >= telemetry["allocated_bytes"]
        assert 0 <= telemetry["fragmentation"] < 1
        assert telemetry["device_total_bytes"] > telemetry["device_used_bytes"] > 0
    finally:
        assert sup.stop(timeout=60) == 0
        assert wait_gone({sup.pid, *sup.worker_pids}) == set()


@pytest.mark.timeout(600)
def test_continuous_batching_graphs_give_the_eager_tokens(gpu_model):
    """Rows joining and leaving a running batch: the CUDA graph of each bucket gives the tokens of
    the same steps run eagerly."""
    from PIL import Image

    from qvl.protocol.contract import ModelOptions
    from qvl.protocol.messages import GenerationParams
    from qvl.worker.continuous import ContinuousEngine
    from qvl.worker.engine import Engine

    images = {key: Image.effect_noise((64 + 48 * key, 96), 30 + key).convert("RGB") for key in range(6)}

    def serve(graphs: bool) -> dict:
        engine = ContinuousEngine(Engine(ModelOptions(str(gpu_model), "cuda:0", kv_cache="continuous",
                                                      kv_cache_tokens=16384)), rows=8)
        engine.capture_prefill()  # both prefill alike: a prefill padded to its graph's bucket rounds otherwise
        if not graphs:
            engine.graph_pool = None  # the same steps, run eagerly
        texts, done = {}, {}
        joins = {0: [0, 1], 2: [2], 5: [3, 4], 9: [5]}
        for step in range(400):
            joining = []  # the requests of a step join together
            for key in joins.get(step, []):
                messages = [{"role": "user", "content": [{"type": "image", "frame": 0},
                                                         {"type": "text", "text": f"Picture {key}?"}]}]
                params = GenerationParams(max_new_tokens=8 + 9 * key, min_new_tokens=8 + 9 * key)
                images_in = engine.process_images(messages, [images[key]], params)
                joining.append((key, engine.prompt(messages, images_in, params), params))
            if joining:
                engine.add(joining)
            if step > max(joins) and not engine.running:
                return done
            for out in engine.step():
                if out.completion is not None:
                    done[out.key] = (out.completion.text, out.completion.completion_tokens)
        raise AssertionError("did not end")

    graphed, eager = serve(True), serve(False)
    assert graphed == eager and len(graphed) == 6


@pytest.mark.timeout(600)
def test_a_packed_graphed_prefill_gives_each_prompts_logits_alone(gpu_model):
    """Prompts of different lengths, with images of different sizes and text only, prefilled together
    end to end through a bucket's CUDA graph: each prompt's next-token logits are those of the
    model's own forward over it alone, to the rounding of its dtype."""
    from PIL import Image
    from qvl.protocol.contract import ModelOptions
    from qvl.protocol.messages import GenerationParams
    from qvl.worker.continuous import ContinuousEngine
    from qvl.worker.engine import NO_IMAGES, Engine
    from qvl.worker.kv_pool import decoder_inputs

    engine = ContinuousEngine(Engine(ModelOptions(str(gpu_model), "cuda:0", kv_cache="continuous",
                                                  kv_cache_tokens=16384)), rows=8)
    engine.capture_prefill()
    params = GenerationParams(max_new_tokens=4)
    prompts = []
    for key, size in enumerate([(448, 448), None, (224, 336), None, (672, 448)]):
        content = [{"type": "text", "text": f"Question {key}: " + "why? " * (7 * key)}]
        if size is None:
            images = NO_IMAGES
        else:
            content.insert(0, {"type": "image", "frame": 0})
            frame = Image.effect_noise(size, 30 + key).convert("RGB")
            images = engine.process_images([{"role": "user", "content": content}], [frame], params)
        prompts.append(engine.prompt([{"role": "user", "content": content}], images, params))
    inputs = engine.engine.inputs(prompts, pad_left=False)
    width = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        given = decoder_inputs(engine.model, inputs)
        packed = engine.packed.prefill(given, [p.ids for p in prompts], width, list(range(len(prompts))))
        assert sum(len(p.ids) for p in prompts) <= max(engine.packed.graphs)  # it ran through a graph
        for row, prompt in enumerate(prompts):
            own = engine.model(**engine.engine.inputs([prompt]).to(engine.device)).logits[0, -1].float()
            error = float((packed[row] - own).abs().max() / own.abs().max())
            print(f"prompt {row}: {len(prompt.ids)} tokens, largest difference {error:.4f} of the largest logit")
            assert error < 0.05, row
        # an add of text alone numbers its prompts itself (an expanded view, copied to the device)
        text_only = [prompts[1], prompts[3]]
        inputs = engine.engine.inputs(text_only, pad_left=False)
        given = decoder_inputs(engine.model, inputs)
        packed = engine.packed.prefill(given, [p.ids for p in text_only], inputs["input_ids"].shape[1], [0, 1])
        for row, prompt in enumerate(text_only):
            own = engine.model(**engine.engine.inputs([prompt]).to(engine.device)).logits[0, -1].float()
            assert float((packed[row] - own).abs().max() / own.abs().max()) < 0.05, row


@pytest.mark.timeout(300)
def test_the_vision_tower_attends_image_by_image_and_the_forward_rarely_waits(gpu_model):
    """The tower's features for images of other sizes, attended to image by image with the lengths
    from the host, are those of transformers' SDPA to bfloat16's rounding; and the forward up to
    the decoder, its inputs made on the host (`host_inputs`), waits for the device at most twice."""
    import warnings

    from PIL import Image
    from qvl.protocol.contract import ModelOptions
    from qvl.protocol.messages import GenerationParams
    from qvl.worker.engine import NO_IMAGES, Engine
    from qvl.worker.kv_pool import decoder_inputs, to_device
    from qvl.worker.vision import FEATURE_TOLERANCE, IMAGE_BY_IMAGE, features, host_inputs

    engine = Engine(ModelOptions(str(gpu_model), "cuda:0", kv_cache="continuous"))
    visual = engine.model.model.visual
    assert visual.config._attn_implementation == IMAGE_BY_IMAGE
    params = GenerationParams(max_new_tokens=4)
    prompts = []
    for key, size in enumerate([(1344, 896), None, (224, 336), (448, 448)]):
        content = [{"type": "text", "text": f"Question {key}: what is it?"}]
        images = NO_IMAGES
        if size is not None:
            content.insert(0, {"type": "image", "frame": 0})
            frame = Image.effect_noise(size, 30 + key).convert("RGB")
            images = engine.process_images([{"role": "user", "content": content}], [frame], params)
        prompts.append(engine.prompt([{"role": "user", "content": content}], images, params))
    inputs = engine.inputs(prompts, pad_left=False)
    assert "image_cu_seqlens" in host_inputs(engine.model, inputs)  # the probe at load passed
    pixels, grid = inputs["pixel_values"].to(engine.device), inputs["image_grid_thw"].to(engine.device)
    with torch.inference_mode():
        made = {name: to_device(value, engine.device) if isinstance(value, torch.Tensor) else value
                for name, value in host_inputs(engine.model, inputs).items() if name.startswith("image_")}
        mine = engine.model.model.get_image_features(pixels, grid, **made)
        visual.config._attn_implementation = "sdpa"
        try:
            sdpa = engine.model.model.get_image_features(pixels, grid)
        finally:
            visual.config._attn_implementation = IMAGE_BY_IMAGE
        for ours, theirs in zip(features(mine), features(sdpa), strict=True):
            error = float((ours - theirs).abs().max() / theirs.abs().max())
            assert error < FEATURE_TOLERANCE, error
        decoder_inputs(engine.model, inputs)  # the first call allocates pinned memory
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                decoder_inputs(engine.model, inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    waits = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    print(f"{len(waits)} waits for the device in the forward up to the decoder")
    assert len(waits) <= 2, waits


@pytest.mark.timeout(300)
def test_a_row_ending_at_a_bucket_boundary_is_captured_safely(gpu_model):
    """A prompt of 255 tokens fills its 256-token bucket exactly when its first step is captured;
    the capture's warm-up runs must not write past the bucket."""
    from qvl.protocol.contract import ModelOptions
    from qvl.protocol.messages import GenerationParams
    from qvl.worker.continuous import ContinuousEngine
    from qvl.worker.engine import NO_IMAGES, Engine

    base = Engine(ModelOptions(str(gpu_model), "cuda:0", kv_cache="continuous", kv_cache_tokens=4096))
    params = GenerationParams(max_new_tokens=4, min_new_tokens=4)
    for words in range(1, 600):
        messages = [{"role": "user", "content": [{"type": "text", "text": "a b " * words}]}]
        if len(base.prompt(messages, NO_IMAGES, params).ids) == 255:
            break
    else:
        pytest.skip("no prompt of exactly 255 tokens")
    engine = ContinuousEngine(base, rows=4)
    engine.add([(0, engine.prompt(messages, NO_IMAGES, params), params)])
    done = [out for _ in range(10) for out in engine.step() if out.completion is not None]
    assert done and done[0].completion.completion_tokens == 4
