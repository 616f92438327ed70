"""Run vllm.LLM once in a fresh process: `python llm_worker.py SPEC.json RESULT.json`.

SPEC: {"model": dir, "engine": {LLM kwargs}, "requests": [{"prompt": str (or "chat":
[messages]), "images": [seed, ...], "max_tokens": n}], "env": {...}}. RESULT: {"token_ids": [[...]],
"texts": [...], "preemptions": n}. vLLM starts its workers with spawn, so this must be a script.
"""
import json
import os
import sys


def sample_image(seed: int, size: int = 56):
    """A deterministic picture: a coloured gradient with a seed-dependent pattern."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [np.sin((x * a + y * b) * np.pi * 4) for a, b in rng.uniform(0.2, 2.0, (3, 2))]
    pixels = ((np.stack(channels, -1) + 1) * 127.5).astype("uint8")
    return Image.fromarray(pixels)


def main(spec_path: str, result_path: str) -> None:
    spec = json.load(open(spec_path))
    os.environ.update({"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
                       "TRANSFORMERS_OFFLINE": "1", **spec.get("env", {})})
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], **spec["engine"])
    prompts, params = [], []
    tokenizer = llm.get_tokenizer()
    for request in spec["requests"]:
        text = request.get("prompt")
        if "chat" in request:  # messages, through the model's chat template
            text = tokenizer.apply_chat_template(request["chat"], add_generation_prompt=True,
                                                 tokenize=False)
        prompt = {"prompt": text}
        if request.get("images"):
            prompt["multi_modal_data"] = {"image": [sample_image(s) for s in request["images"]]}
        prompts.append(prompt)
        params.append(SamplingParams(max_tokens=request["max_tokens"], temperature=0.0,
                                     ignore_eos=request.get("ignore_eos", True)))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    preemptions = 0
    if spec["engine"].get("disable_log_stats") is False:  # metrics exist only with stats on
        preemptions = sum(getattr(m, "value", 0) for m in llm.get_metrics()
                          if m.name == "vllm:num_preemptions")
    json.dump({"token_ids": [list(o.outputs[0].token_ids) for o in outputs],
               "texts": [o.outputs[0].text for o in outputs],
               "preemptions": preemptions}, open(result_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
