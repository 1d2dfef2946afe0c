"""`phimm serve`: an OpenAI-compatible HTTP server over phimm's continuous-batching engine.

`phimm.serve.app.build_app(pipe)` gives the FastAPI app; `phimm.serve.cli` the command line. Importing this
package is cheap: FastAPI, uvicorn and prometheus-client are imported only by `phimm.serve.app`.
"""
