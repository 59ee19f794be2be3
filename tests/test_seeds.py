"""igpt_cli.seeds: every command takes seeds 0..2**64-1 and refuses others before any work."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_bad_input, invoke, make_image_folder, make_tokens
from igpt_cli.errors import ParameterError
from igpt_cli.seeds import MAX_SEED, check_seed, random_state

TOO_BIG = "99999999999999999999999"


@pytest.mark.parametrize("bad", [-1, 2**64, 10**23, 1.5, "3", True, None])
def test_check_seed_refuses_what_is_not_an_integer_in_range(bad):
    with pytest.raises(ParameterError, match=r"seed=.*: must be an integer from 0 to 18446744073709551615"):
        check_seed(bad)


def test_check_seed_takes_the_whole_range_and_sklearn_gets_a_seed_it_accepts():
    assert check_seed(0) == 0 and check_seed(MAX_SEED) == MAX_SEED and check_seed(np.uint64(MAX_SEED)) == MAX_SEED
    assert random_state(7) == 7  # a seed scikit-learn takes is passed as it is: earlier results stay the same
    a, b = random_state(2**40), random_state(2**40)
    assert isinstance(a, np.random.RandomState) and a.randint(0, 2**31, 5).tolist() == b.randint(0, 2**31, 5).tolist()
    assert random_state(2**40).randint(0, 2**31, 5).tolist() != random_state(2**40 + 1).randint(0, 2**31, 5).tolist()


@pytest.mark.parametrize("command", ["quantize", "features", "palette", "show", "sample", "complete", "probe"])
def test_a_seed_out_of_range_is_refused_before_any_work(tmp_path, command):
    folder = make_image_folder(tmp_path / "ds", per_class=1)
    tokens = make_tokens(tmp_path / "t.h5", 3, 8)
    out = tmp_path / ("o.png" if command == "show" else "o.npy" if command == "palette" else "o.h5")
    args = {"quantize": ["quantize", folder, "--size", "8", "-o", out],
            "features": ["features", folder, "-m", "igpt-cifar8", "-o", out],
            "palette": ["palette", "fit", folder, "-k", "4", "-o", out],
            "show": ["show", tokens, "-o", out],
            "sample": ["sample", "igpt-cifar8", "-n", "2", "-o", out],
            "complete": ["complete", tokens, "-m", "igpt-cifar8", "-o", out],
            "probe": ["probe", tokens]}[command]
    r = invoke(*args, "--seed", TOO_BIG, "-q")
    assert_bad_input(r, out, f"--seed {TOO_BIG}: must be an integer from 0 to")


def test_palette_fit_takes_a_seed_beyond_what_scikit_learn_accepts(tmp_path):
    folder = make_image_folder(tmp_path / "ds", per_class=1)
    for name in ("a", "b"):
        r = invoke("palette", "fit", folder, "-k", "4", "-o", tmp_path / f"{name}.npy", "--seed", str(2**40), "-q")
        assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
