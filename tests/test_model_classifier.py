"""`model.classifier`: IGPTClassifier as transformers' ImageGPTForImageClassification, in and out."""
import numpy as np
import pytest
import torch

from igpt_cli.model import IGPTConfig, save_pretrained, sos_shift
from igpt_cli.model.checkpoint import CheckpointError
from igpt_cli.model.classifier import IGPTClassifier, load_classifier, save_classifier

CFG = IGPTConfig(vocab_size=17, n_positions=9, n_embd=32, n_layer=2, n_head=4)


def random_classifier(seed=0) -> IGPTClassifier:
    torch.manual_seed(seed)
    m = IGPTClassifier(CFG, 5)
    with torch.no_grad():  # non-trivial layer-norm gains and biases, so ln_f and pooling mix-ups show
        for name, p in m.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5)
    return m.eval()


def test_transformers_reads_our_classifier_and_we_read_it_back(tmp_path):
    from transformers import ImageGPTForImageClassification

    ours = random_classifier()
    save_classifier(ours, tmp_path / "c", ["ant", "bee", "cat", "dog", "eel"])
    hf = ImageGPTForImageClassification.from_pretrained(tmp_path / "c").eval()
    assert hf.config.id2label[4] == "eel" and hf.config.label2id["ant"] == 0
    idx = sos_shift(torch.from_numpy(np.random.default_rng(0).integers(0, 16, (6, 9))), CFG.sos_token)
    with torch.no_grad():
        theirs = hf(input_ids=idx).logits
        mine, gen = ours(idx)
        # transformers' own definition: the mean over positions of last_hidden_state, then score
        pooled = hf.transformer(input_ids=idx).last_hidden_state.mean(1)
        again = hf.score(pooled)
    assert float((theirs - mine).abs().max()) < 1e-4
    assert float((again - theirs).abs().max()) < 1e-6
    assert gen.shape == (6, 9, 16)
    back, names = load_classifier(tmp_path / "c")
    assert names == ["ant", "bee", "cat", "dog", "eel"]
    with torch.no_grad():
        assert torch.equal(back(idx, generative=False)[0], mine)


def test_a_model_without_a_classification_head_is_refused(tmp_path):
    save_pretrained(random_classifier().transformer, tmp_path / "lm")
    with pytest.raises(CheckpointError, match="no classification head"):
        load_classifier(tmp_path / "lm")
