"""Where samples come from: image folders, manifests, decoding, and the quarantine of bad or duplicate ones."""
