"""fdpipe/seeds.py: the one seed derivation, pinned to the values the four former copies gave (stores record plan
seeds, and the golden losses and resumed runs depend on the epoch and step seeds)."""

from __future__ import annotations

from fdpipe.augment import view_seed
from fdpipe.finetune.data import item_seed
from fdpipe.replay.order import epoch_rng
from fdpipe.seeds import derive_seed, seeded_rng


def test_derive_seed_is_blake2b_64_of_the_parts_joined_by_slashes_as_before():
    # computed with the former inline code: int.from_bytes(blake2b("0/0/perm", digest_size=8), "little")
    assert derive_seed(0, 0, "perm") == 8045431838605004755
    assert derive_seed(3, 2, "shard-views") == 9389760561506795702
    assert int(seeded_rng(3, 2, "shard-views").integers(0, 2**63)) == 5074822538018731085  # Philox of that seed


def test_the_four_seeded_streams_give_the_values_of_their_former_derivations():
    # values computed with the code before the derivations were merged (augment, replay.order, finetune)
    assert [view_seed(0, "img_000", 0), view_seed(7, "n01440764/ILSVRC2012_val_00000293", 1023)] == [
        7954941350437231686, 11924746394076473805]
    assert [int(epoch_rng(0, 0, "perm").integers(0, 2**63)), int(epoch_rng(3, 2, "shard-views").integers(0, 2**63))
            ] == [5132476020539880323, 5074822538018731085]
    assert [item_seed(0, 0, 0), item_seed(5, 3, 12345)] == [9331121694215625775, 392203769111589532]
    # finetune/train.py's per-step seed (mixup, drop path) is derive_seed(seed, step, rank, "step")
    assert [derive_seed(0, 0, 0, "step"), derive_seed(11, 700, 3, "step")] == [16442451274531475726, 260668426254799511]
