"""What main.py assembles a training run from: config resolution, the data module, callbacks and checkpoint IO."""
