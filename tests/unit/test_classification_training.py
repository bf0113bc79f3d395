"""The trainer's classification parts: example batches addressed by step (each epoch a permutation),
class weights, and which way the monitored figure improves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmctl.training.examples import ExampleBatches, class_weight_tensor
from llmctl.training.state import monitor_is_better
from llmctl.training.steps import steps_for_epochs


def batches(n: int = 10, batch_size: int = 4, seed: int = 0) -> ExampleBatches:
    ids = np.arange(n * 6, dtype=np.int32).reshape(n, 6)
    lengths = np.array([1 + i % 6 for i in range(n)], dtype=np.int32)
    labels = np.arange(n, dtype=np.int64) % 3
    return ExampleBatches(ids, lengths, labels, batch_size, seed)


def test_every_epoch_visits_each_example_once_in_a_seeded_order() -> None:
    b = batches(n=10, batch_size=5)
    epoch0 = np.concatenate([b.indices(0), b.indices(1)])
    epoch1 = np.concatenate([b.indices(2), b.indices(3)])
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10))
    assert not np.array_equal(epoch0, epoch1)  # reshuffled
    assert np.array_equal(batches(n=10, batch_size=5).indices(3), b.indices(3))  # a step's batch is fixed: resumable


def test_a_batch_straddling_two_epochs_takes_the_end_of_one_and_the_start_of_the_next() -> None:
    b = batches(n=10, batch_size=4)
    step2 = b.indices(2)  # slots 8..11: the last two of epoch 0, the first two of epoch 1
    assert list(step2[:2]) == list(b._permutation(0)[8:]) and list(step2[2:]) == list(b._permutation(1)[:2])


def test_rows_are_cut_to_the_longest_text_and_micro_batches_split_per_process() -> None:
    b = batches(n=10, batch_size=4)
    ids, lengths, labels = b.rows(np.array([0, 1]))  # lengths 1 and 2
    assert ids.shape == (2, 2) and lengths.tolist() == [1, 2] and labels.dtype == torch.int64
    parts = b.micro_batches(step=0, rank=1, world=2, micro_batch_size=1)
    assert len(parts) == 2 and [int(p[2]) for p in parts] == [int(x) % 3 for x in b.indices(0)[2:]]


def test_class_weights_none_balanced_or_listed() -> None:
    labels = np.array([0, 0, 0, 1])
    assert class_weight_tensor("none", labels, 2) is None
    assert class_weight_tensor("balanced", labels, 2).tolist() == pytest.approx([4 / 6, 4 / 2])
    assert class_weight_tensor([1.0, 3.0], labels, 2).tolist() == [1.0, 3.0]
    with pytest.raises(Exception, match="2 weights for 3 classes"):
        class_weight_tensor([1.0, 3.0], labels, 3)


def test_loss_goes_down_scores_go_up() -> None:
    assert monitor_is_better("val_loss", 0.5, 0.6, 0.0) and not monitor_is_better("val_loss", 0.6, 0.5, 0.0)
    assert monitor_is_better("val_f1", 0.9, 0.8, 0.0) and not monitor_is_better("val_accuracy", 0.8, 0.8, 0.0)
    assert not monitor_is_better("val_f1", 0.805, 0.8, 0.01) and monitor_is_better("val_f1", 0.1, None, 0.0)


def test_epochs_become_steps_rounding_up() -> None:
    assert steps_for_epochs(10, 4800, 32) == 1500 and steps_for_epochs(0.5, 10, 4) == 2


def test_a_gpt_classifier_starts_from_a_language_models_backbone_and_keeps_its_own_head(tmp_path) -> None:
    from llmctl.data.tokenizer import train_tokenizer
    from llmctl.models.model_dir import save_model_dir
    from llmctl.models.registry import build_model
    from llmctl.models.init_from import load_weights_into

    shape = {"family": "gpt", "vocab_size": 300, "n_layer": 1, "n_head": 2, "d_model": 16, "context_length": 16}
    tokenizer = train_tokenizer(["a b c d e f g"] * 5, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    lm = build_model(shape)
    save_model_dir(lm, tmp_path / "lm", tokenizer_path=tmp_path / "tokenizer.json", provenance={})
    torch.manual_seed(1)
    classifier = build_model({**shape, "num_classes": 3, "pad_id": 0, "max_len": 8, "labels": ["x", "y", "z"]})
    head = classifier.score.weight.detach().clone()
    load_weights_into(classifier, tmp_path / "lm")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(classifier.state_dict()[q], lm.state_dict()[q])
    assert torch.equal(classifier.score.weight, head)
