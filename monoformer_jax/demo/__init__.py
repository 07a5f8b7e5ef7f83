"""A demo in the browser: `python -m monoformer_jax.demo --workdir RUN [--port N]`.

Serves one page with three panels over a loaded run: draw digits by class or from a free-text
caption (guidance, steps, seed), draw a digit with the mouse and ask the model what it is (a run
that reads images, e.g. configs/mnist_tiny.py:all_in_one), and continue a text prompt.

A small page of our own rather than Gradio: the page needs four buttons, a canvas and some
images, which one static HTML/JS file (`page.html`) and the standard library's
`http.server` (`server.py`, a JSON API) give with no new dependency, while Gradio would bring
FastAPI, uvicorn, pandas and some hundred MB beside, and its own version churn, to every install
and test run. The requests are bounded (`service.LIMITS`: images, steps, tokens, prompt length);
a bad value is answered on the page, never with a crash of the server.
"""
