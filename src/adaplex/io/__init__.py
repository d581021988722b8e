"""Files: adapter directories, bundles, expert banks on disk, PEFT interop, fingerprints, atomic writes."""
