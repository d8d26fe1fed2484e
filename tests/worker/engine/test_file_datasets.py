"""Training on users' files keeps accumulation exact: for any (m, k) the same weights as
(m·k, 1), in fp64, with variable-length texts, prompt/completion losses, regression and
the last partial window; and the loss each kind is trained on is the one it should be."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from app.jobs.spec import FileDatasetSpec, JobSpec, TinyGptSpec
from worker.datafiles.load import load_file_dataset
from worker.engine.batching import epoch_order
from worker.engine.checkpoint import Checkpoint, unpack_state
from worker.engine.data_types import DataInfo, TextClassificationSet
from worker.engine.errors import TrainingError
from worker.engine.models import build_tiny_gpt
from worker.engine.optim import build_optimizer, build_scheduler
from worker.engine.precision import plan_precision
from worker.engine.trainer import Callbacks, StepMetrics, drive, evaluate, prepare_run, train
from worker.engine.window import StepParts, accumulate_gradients

from .conftest import assert_close_relative, flat_parameters, make_spec
from .test_trainer import SPLITS, weights_vector

TRAIN_ID = "file_" + "1" * 24
VALIDATION_ID = "file_" + "2" * 24
TINY_GPT = {"type": "tiny-gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 64}
ADAMW = {
    "optimizer": {"type": "adamw", "lr": 0.01, "weight_decay": 0.1},
    "lr_schedule": {"type": "cosine", "warmup_steps": 2},
    "grad_clip_norm": 0.5,
}


class Files:
    """A dict-backed FileSource over files the test writes to tmp_path."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.paths: dict[str, Path] = {}

    def __call__(self, file_id: str) -> Path:
        return self.paths[file_id]

    def write(self, file_id: str, format: str, text: str) -> None:
        self.paths[file_id] = self.directory / f"{file_id}.{format}"
        self.paths[file_id].write_text(text, encoding="utf-8")

    def jsonl(self, file_id: str, rows: list[dict[str, Any]]) -> None:
        self.write(file_id, "jsonl", "".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


def variable_length_texts(count: int, seed: int = 1) -> list[str]:
    """Mostly short texts and a few long ones: the mix a per-micro-batch mean gets wrong."""
    generator = random.Random(seed)
    lengths = [generator.choice([2, 3, 5, 8, 60]) for _ in range(count)]
    return ["".join(generator.choice("abcdefgh é") for _ in range(n)) for n in lengths]


def file_spec(**overrides: Any) -> JobSpec:
    # The whole training file trains (nothing held out), as these tests count on.
    dataset = {"type": "file", "file_id": TRAIN_ID, "max_length": 65, "eval_fraction": 0}
    dataset |= overrides.pop("dataset", {})
    return make_spec(dataset=dataset, precision="fp64", **overrides)


def final_weights_of_every_split(files: Files, **overrides: Any) -> list[torch.Tensor]:
    finals = []
    for micro, steps in SPLITS:
        spec = file_spec(micro_batch_size=micro, accumulation_steps=steps, **overrides)
        finals.append(weights_vector(train(spec, files=files).weights))
    return finals


def test_variable_length_texts_end_at_the_same_weights_for_any_split(files: Files) -> None:
    # 21 rows: windows of 8, 8 and a partial 5 in every epoch.
    files.jsonl(TRAIN_ID, [{"text": text} for text in variable_length_texts(21)])
    finals = final_weights_of_every_split(files, model=TINY_GPT, epochs=2, max_steps=None, **ADAMW)
    for final in finals[1:]:
        assert_close_relative(final, finals[0], 1e-12)


def test_prompt_completion_ends_at_the_same_weights_for_any_split(files: Files) -> None:
    prompts, completions = variable_length_texts(16, seed=2), variable_length_texts(16, seed=3)
    files.jsonl(
        TRAIN_ID,
        [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)],
    )
    finals = final_weights_of_every_split(files, model=TINY_GPT, max_steps=4, **ADAMW)
    for final in finals[1:]:
        assert_close_relative(final, finals[0], 1e-12)


def test_prompt_completion_gradient_is_the_mean_over_completion_tokens(files: Files) -> None:
    """Against plain PyTorch on each unpadded row: prompts read, never predicted."""
    rows = [("ab", "c"), ("", "hello there"), ("a long prompt here", "xy"), ("q", "é")]
    files.jsonl(TRAIN_ID, [{"prompt": p, "completion": c} for p, c in rows])
    run = prepare_run(
        file_spec(model=TINY_GPT, micro_batch_size=1, accumulation_steps=4), files=files
    )
    reference = copy.deepcopy(run.parts.model)
    loss, units = torch.zeros((), dtype=torch.float64), 0
    for prompt, completion in rows:
        prompt_ids = [b + 1 for b in prompt.encode()]
        tokens = torch.tensor([prompt_ids + [b + 1 for b in completion.encode()]])
        start = max(1, len(prompt_ids))  # the first token to predict
        logits = reference(tokens[:, :-1])[0, start - 1 :]
        loss = loss + F.cross_entropy(logits, tokens[0, start:], reduction="sum")
        units += tokens.shape[1] - start
    (loss / units).backward()
    expected = torch.cat([p.grad.flatten() for p in reference.parameters()])

    accumulate_gradients(run.parts, run.data.train, [[0], [1, 2], [3]])
    actual = torch.cat([p.grad.flatten() for p in run.parts.model.parameters()])
    assert run.data.train.loss_units([0, 1, 2, 3]) == units == 1 + 10 + 2 + 2
    assert_close_relative(actual, expected, 1e-12)


def prompt_completion_rows(count: int) -> list[dict[str, str]]:
    prompts, completions = variable_length_texts(count, seed=2), variable_length_texts(count, 3)
    return [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)]


def test_packed_prompt_completion_ends_at_the_same_weights_for_any_split(files: Files) -> None:
    files.jsonl(TRAIN_ID, prompt_completion_rows(40))
    finals = final_weights_of_every_split(
        files, model=TINY_GPT, max_steps=3, dataset={"packing": True}, **ADAMW
    )
    for final in finals[1:]:
        assert_close_relative(final, finals[0], 1e-12)


def test_packing_changes_which_rows_share_a_step_not_how_each_row_counts(files: Files) -> None:
    """One SGD step over the whole file, packed and not: the same rows, so the same loss,
    gradient (lr 1: the same weights) and held-out loss."""
    files.jsonl(TRAIN_ID, prompt_completion_rows(24))
    results = {}
    for packing in (False, True):
        spec = file_spec(
            model=TINY_GPT,
            micro_batch_size=4,
            accumulation_steps=8,
            max_steps=1,
            eval_every=1,
            optimizer={"type": "sgd", "lr": 1.0},
            dataset={"packing": packing, "eval_fraction": 0.25},
        )
        steps: list[StepMetrics] = []
        result = train(spec, Callbacks(on_step=steps.append), files=files)
        results[packing] = (steps[0], weights_vector(result.weights))
    (unpacked, unpacked_weights), (packed, packed_weights) = results[False], results[True]
    assert packed.window_samples < unpacked.window_samples  # packs, and rows
    assert packed.tokens_seen == unpacked.tokens_seen
    assert packed.loss == pytest.approx(unpacked.loss, rel=1e-12)
    assert packed.grad_norm == pytest.approx(unpacked.grad_norm, rel=1e-12)
    assert packed.eval_loss == pytest.approx(unpacked.eval_loss, rel=1e-12)
    assert (packed_weights - unpacked_weights).abs().max() <= 1e-12


def test_resume_needs_the_same_packing_and_takes_checkpoints_from_before_it(
    files: Files, tmp_path: Path
) -> None:
    files.jsonl(TRAIN_ID, prompt_completion_rows(8))
    unpacked = file_spec(model=TINY_GPT, micro_batch_size=4, accumulation_steps=1, max_steps=1)
    train(unpacked, Callbacks(on_checkpoint=lambda saved: saved.write(tmp_path)), files=files)
    saved = Checkpoint.read(tmp_path)
    packed = file_spec(
        model=TINY_GPT,
        micro_batch_size=4,
        accumulation_steps=1,
        max_steps=1,
        dataset={"packing": True},
    )
    with pytest.raises(TrainingError) as failure:
        train(packed, resume=saved, files=files)
    assert failure.value.type == "incompatible_checkpoint"
    # Written before dataset.packing existed: it trained unpacked, and resumes so.
    state = unpack_state(saved.state)
    del state["training"]["dataset"]["packing"]
    older = io.BytesIO()
    torch.save(state, older)
    resumed = train(
        unpacked, resume=dataclasses.replace(saved, state=older.getvalue()), files=files
    )
    assert resumed.status == "completed"


REGRESSION_CSV = "a,b,c,target\n" + "".join(
    f"{i % 5 - 2},{(i * 7) % 11 / 10},{i / 45},{(i % 5 - 2) * 0.5 + i / 45}\n" for i in range(45)
)


def test_csv_regression_ends_at_the_same_weights_for_any_split(files: Files) -> None:
    files.write(TRAIN_ID, "csv", REGRESSION_CSV)
    finals = final_weights_of_every_split(
        files, model={"type": "mlp", "hidden_sizes": [8]}, max_steps=8, **ADAMW
    )
    for final in finals[1:]:
        assert_close_relative(final, finals[0], 1e-12)


def manual_regression_sgd(spec: JobSpec, files: Files, epochs: int) -> torch.Tensor:
    """A hand-written reference: every window, the short tail too, is one batch of mean
    squared error per sample."""
    run = prepare_run(spec, files=files)
    model, data, lr = copy.deepcopy(run.parts.model), run.data.train, spec.optimizer.lr
    for epoch in range(epochs):
        order = epoch_order(len(data), spec.seed, epoch)
        for start in range(0, len(order), spec.window_size):
            batch = data.collate(order[start : start + spec.window_size])
            outputs = model(batch.inputs.double())
            loss = ((outputs - batch.targets.double()) ** 2).sum(dim=1).mean()
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter -= lr * parameter.grad
    return flat_parameters(model)


def test_last_partial_window_of_a_regression_file_is_a_full_batch_step(files: Files) -> None:
    files.write(TRAIN_ID, "csv", REGRESSION_CSV)
    spec = file_spec(
        model={"type": "mlp", "hidden_sizes": [8]},
        micro_batch_size=2,
        accumulation_steps=4,
        epochs=2,
        max_steps=None,
        optimizer={"type": "sgd", "lr": 0.05},
    )
    run = prepare_run(spec, files=files)
    metrics: list[StepMetrics] = []
    drive(run, Callbacks(on_step=metrics.append))
    # 45 rows: five windows of 8 and a tail of 5, per epoch.
    assert [m.samples_seen for m in metrics][4:7] == [40, 45, 53]
    assert_close_relative(
        flat_parameters(run.parts.model), manual_regression_sgd(spec, files, 2), 1e-10
    )


def test_regression_evaluation_is_the_mean_squared_error_per_sample(files: Files) -> None:
    files.write(TRAIN_ID, "csv", REGRESSION_CSV)
    files.write(VALIDATION_ID, "csv", "x1,x2,x3,target\n1,2,3,0.5\n0,0,0,-1\n4,5,6,2\n")
    spec = file_spec(
        model={"type": "mlp", "hidden_sizes": [8]},
        dataset={"validation_file_id": VALIDATION_ID},
        micro_batch_size=2,
        accumulation_steps=1,
        max_steps=2,
        eval_every=1,
    )
    run = prepare_run(spec, files=files)
    metrics: list[StepMetrics] = []
    drive(run, Callbacks(on_step=metrics.append))
    assert all(m.eval_loss is not None and m.eval_accuracy is None for m in metrics)
    held = run.data.eval
    assert held is not None
    batch = held.collate([0, 1, 2])
    with torch.no_grad():
        expected = ((run.parts.model(batch.inputs.double()) - batch.targets) ** 2).sum() / 3
    assert evaluate(run, held) == (pytest.approx(float(expected), rel=1e-12), None)
    assert metrics[-1].eval_loss == pytest.approx(float(expected), rel=1e-12)


def test_csv_classification_trains_and_evaluates_accuracy(files: Files) -> None:
    rows = "".join(f"{i % 3},{(i * 5) % 7},{'abc'[i % 3]}\n" for i in range(30))
    files.write(TRAIN_ID, "csv", "x,y,label\n" + rows)
    spec = file_spec(
        model={"type": "mlp", "hidden_sizes": [8]},
        dataset={"eval_fraction": 0.2},
        micro_batch_size=4,
        accumulation_steps=2,
        max_steps=3,
        eval_every=3,
    )
    metrics: list[StepMetrics] = []
    train(spec, Callbacks(on_step=metrics.append), files=files)
    assert metrics[-1].eval_accuracy is not None
    assert 0.0 <= metrics[-1].eval_accuracy <= 1.0


class MaskedMeanClassifier(nn.Module):
    """Embeddings averaged over the real tokens only: padding must not matter."""

    def __init__(self, vocab_size: int, classes: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, 8)
        self.head = nn.Linear(8, classes)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(self.embedding.weight.dtype)
        pooled = (self.embedding(tokens) * mask).sum(dim=1) / mask.sum(dim=1)
        return self.head(torch.tanh(pooled))


def test_labelled_text_window_gradient_is_the_same_for_any_split(files: Files) -> None:
    texts = variable_length_texts(8, seed=4)
    files.jsonl(TRAIN_ID, [{"text": t, "label": len(t) % 3} for t in texts])
    spec = file_spec()
    assert isinstance(spec.dataset, FileDatasetSpec)
    data = load_file_dataset(spec.dataset, 0, files, None)
    assert isinstance(data.train, TextClassificationSet)
    gradients = []
    for micro, _ in SPLITS:
        torch.manual_seed(0)
        model = MaskedMeanClassifier(257, 3).double()
        optimizer = build_optimizer(spec.optimizer, model.parameters())
        parts = StepParts(
            model,
            optimizer,
            build_scheduler(spec.lr_schedule, optimizer, 1),
            plan_precision("fp64", torch.device("cpu")).grad_scaler(),
            plan_precision("fp64", torch.device("cpu")),
            None,
        )
        indices = list(range(8))
        accumulate_gradients(
            parts, data.train, [indices[i : i + micro] for i in range(0, 8, micro)]
        )
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    for gradient in gradients[1:]:
        assert_close_relative(gradient, gradients[0], 1e-12)


# ---------------------------------------------------------------- refusals


def test_a_file_dataset_without_a_file_source_trains_only_on_the_service() -> None:
    with pytest.raises(TrainingError) as failure:
        train(file_spec(model=TINY_GPT))
    assert failure.value.type == "invalid_spec"
    assert "uploaded to the service" in failure.value.message


def test_tiny_gpt_block_size_must_cover_max_length() -> None:
    # The spec refuses this at submit; the builder holds it for any other way in.
    with pytest.raises(TrainingError) as failure:
        build_tiny_gpt(TinyGptSpec(block_size=64), DataInfo(vocab_size=257, max_length=100))
    assert failure.value.type == "invalid_spec"
    assert failure.value.message == (
        "model.block_size must be at least dataset.max_length - 1 = 99, not 64"
    )


def test_the_model_tokenizer_needs_a_hugging_face_model(files: Files) -> None:
    # The spec refuses it at submit; a spec stored before that rule still fails cleanly.
    with pytest.raises(ValidationError, match=r"dataset\.tokenizer"):
        file_spec(model=TINY_GPT, dataset={"tokenizer": "model"})
    spec = file_spec(model=TINY_GPT)
    stored = spec.model_copy(
        update={"dataset": spec.dataset.model_copy(update={"tokenizer": "model"})}
    )
    files.jsonl(TRAIN_ID, [{"text": "abc"}])
    with pytest.raises(TrainingError) as failure:
        prepare_run(stored, files=files)
    assert failure.value.type == "invalid_spec"
    assert "dataset.tokenizer 'model' needs a Hugging Face model" in failure.value.message
