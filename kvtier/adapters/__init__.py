"""Engine adapters: the only code that imports an inference engine. Import the submodule you need."""
