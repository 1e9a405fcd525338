"""The champion, served: to Label Studio as its ML backend, and to anyone with images."""
