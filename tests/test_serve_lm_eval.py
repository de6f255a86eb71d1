"""lm-evaluation-harness's `local-completions` model against the server (its loglikelihood requests: echo,
logprobs, token-id prompts; tokenized through the server's /tokenize): the accuracy of a small multiple-choice
task made here equals the same task scored directly with the model's log_softmax."""
import json
import os

import pytest
import torch
from test_serve_http import Server

from rwkv_lm import RWKVConfig
from rwkv_lm.serve import Engine
from rwkv_lm.testing import random_model

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [("The sky is", [" blue", " green", " loud"], 0), ("Two plus two is", [" four", " five"], 0),
             ("Cats say", [" meow", " woof", " moo"], 0), ("Fire is", [" hot", " cold"], 0),
             ("The sun rises in the", [" east", " west"], 0), ("Ice is", [" cold", " hot", " purple"], 0),
             ("Birds can", [" fly", " swim", " read"], 1), ("Water is", [" wet", " dry"], 1)]
TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
"""


def direct_accuracy(model, tokenizer) -> float:
    """Each question's choices scored as lm-eval scores them: the continuation's tokens are those of the whole
    text after the context's, summed log_softmax."""
    right = 0
    for question, choices, answer in QUESTIONS:
        context = tokenizer.encode(question)
        scores = []
        for choice in choices:
            whole = tokenizer.encode(question + choice)
            with torch.no_grad():
                logits = model(torch.tensor([whole]))[0][0, :, :tokenizer.vocab_size].float().log_softmax(-1)
            scores.append(sum(logits[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        right += max(range(len(choices)), key=scores.__getitem__) == answer
    return right / len(QUESTIONS)


def test_local_completions_accuracy_equals_direct_scoring(tmp_path, world):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    cfg = RWKVConfig(vocab_size=65536, n_layer=2, n_embd=32, head_size=16, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=8)
    model = random_model(cfg, seed=77)
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tmp_path / "tiny.yaml").write_text(TASK.format(data=data))
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    server = Server(Engine(model, world, max_batch=8), model_name="tiny")
    try:
        results = simple_evaluate(
            model="local-completions", tasks=["tiny_choice"], task_manager=TaskManager(include_path=str(tmp_path)),
            model_args=f"base_url={server.url}/v1/completions,model=tiny,tokenizer_backend=remote,"
                       "tokenized_requests=True,num_concurrent=1,max_retries=1")
    finally:
        server.stop()
    accuracy = results["results"]["tiny_choice"]["acc,none"]
    assert accuracy == pytest.approx(direct_accuracy(model, world))
