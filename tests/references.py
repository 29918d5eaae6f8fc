"""What plain transformers answers, for the exact comparisons: greedy, float32, on the CPU, with the
checkpoint's own processor and chat template, as a user of transformers would call it."""

from __future__ import annotations

import numpy as np


def reference_answer(model_dir, kind: str, prompt: str, images=(), system_prompt=None,
                     max_new_tokens: int = 12) -> tuple[str, int]:
    """(answer, prompt tokens) for a text, VL or Omni-thinker checkpoint and some pictures."""
    import torch
    from PIL import Image
    from transformers import (AutoModelForCausalLM, AutoModelForMultimodalLM, AutoProcessor, AutoTokenizer,
                              Qwen2_5OmniThinkerForConditionalGeneration)

    if kind == "text":
        processor = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
            [{"role": "user", "content": prompt}]
    else:
        processor = AutoProcessor.from_pretrained(model_dir)
        cls = Qwen2_5OmniThinkerForConditionalGeneration if kind == "omni" else AutoModelForMultimodalLM
        model = cls.from_pretrained(model_dir, dtype=torch.float32)
        content = [{"type": "image", "image": Image.open(path).convert("RGB")} for path in images]
        messages = [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    prompt_tokens = inputs["input_ids"].shape[-1]
    tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer.decode(output[0, prompt_tokens:], skip_special_tokens=True), prompt_tokens


def reference_thinker(model_dir, prompt: str, images=(), audio_files=()) -> tuple[str, int]:
    """(answer, prompt tokens) from the Omni thinker with pictures and recordings. Audio is read with
    soundfile, downmixed and resampled with soxr, as Qwen's own loaders do."""
    import soundfile
    import soxr
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Qwen2_5OmniThinkerForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    pictures = [Image.open(path).convert("RGB") for path in images]
    sounds = []
    for path in audio_files:
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
        sounds.append(soxr.resample(samples.mean(axis=1), rate, 16000).astype(np.float32))
    content = [{"type": "image"} for _ in pictures] + [{"type": "audio"} for _ in sounds]
    messages = [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=pictures or None, audio=sounds or None, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    prompt_tokens = inputs["input_ids"].shape[-1]
    return processor.tokenizer.decode(output[0, prompt_tokens:], skip_special_tokens=True), prompt_tokens


def reference_chat(model_dir, turns: list[tuple[str, list]]) -> list[str]:
    """A VL model, turn after turn, each answer added to the history."""
    import torch
    from PIL import Image
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForMultimodalLM.from_pretrained(model_dir, dtype=torch.float32)
    messages, answers = [], []
    for text, images in turns:
        content = [{"type": "image", "image": Image.open(path).convert("RGB")} for path in images]
        messages.append({"role": "user", "content": content + [{"type": "text", "text": text}]})
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        answer = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[-1]:], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        answers.append(answer)
    return answers
