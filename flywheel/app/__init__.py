"""Entry points: the command line and the webhook receiver's web app (the only library code that may use Prefect)."""
