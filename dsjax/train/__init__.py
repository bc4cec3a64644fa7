"""Supervised training: data (Grain), the train step (loss, optimizer, state shardings), the run
loop (`loop.train_and_evaluate`), metrics and FLOP accounting."""
