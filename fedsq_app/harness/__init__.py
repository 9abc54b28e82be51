"""Harnesses that run the real ServerApp and ClientApp: in this process, in Flower's simulation, or as
local deployment processes on 127.0.0.1. For tests and tools; the apps never import them."""
