"""Which DIA sources get alerts: apbatch.job.alert_policy."""

import numpy as np
import pandas as pd
from apbatch.job.alert_policy import REJECT_FLAGS, split_alertable


def _table():
    df = pd.DataFrame({
        "diaSourceId": np.arange(10, 15, dtype=np.int64),
        "psfFlux": [1.0, 2.0, 3.0, 4.0, 5.0],
        "pixelFlags_saturated": [False, True, False, True, False],
        "pixelFlags_suspect": [False, False, True, True, None],
        "pixelFlags_cr": [True, False, False, False, False],
    })
    df.attrs["noise_scale"] = 1.1
    return df


def test_flagged_rows_are_left_out_and_counted_per_flag():
    kept, rejected = split_alertable(_table())
    # row 0 has only a CR flag (a real source may sit on an interpolated cosmic ray): kept
    assert kept["diaSourceId"].tolist() == [10, 14]
    assert rejected == {"pixelFlags_saturated": 2, "pixelFlags_suspect": 2, "total": 3}
    assert kept.attrs == {"noise_scale": 1.1}
    assert set(REJECT_FLAGS) == {"pixelFlags_saturated", "pixelFlags_suspect"}


def test_ids_are_those_of_the_full_table():
    kept, _ = split_alertable(_table(), reject_flags=("pixelFlags_cr",))
    assert kept["diaSourceId"].tolist() == [11, 12, 13, 14]
    assert kept.index.tolist() == [0, 1, 2, 3]


def test_missing_flag_column_counts_as_unset_and_empty_table_works():
    df = _table().drop(columns=["pixelFlags_suspect"])
    kept, rejected = split_alertable(df)
    assert len(kept) == 3 and rejected["total"] == 2 and "pixelFlags_suspect" not in rejected
    kept, rejected = split_alertable(df.iloc[:0])
    assert len(kept) == 0 and rejected["total"] == 0
