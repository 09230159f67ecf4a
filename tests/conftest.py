import os

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# Ray Train's controller polls its workers every 2 s by default, and each fit waits on several polls: at
# 0.25 s a one-worker fit of the smoke data took 20 s instead of 22 s here. Set before any Ray starts, so
# the session's Ray, the subprocess drivers and the `ray start` nodes of the e2e test all inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
