"""Load tests: a locust user for OpenAI-compatible servers and a runner that starts the server under test."""
