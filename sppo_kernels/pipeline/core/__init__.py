"""The trainer's core: options and flags, the run layout (schema), fingerprints, crash-safe storage, the stage
protocol, the process layout and prompt sets. It imports nothing else of the trainer."""
