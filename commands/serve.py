"""The search service and its page."""
from __future__ import annotations

import click

from duch.pipeline.config import ServeConfig

from .options import device_option, option, runtime_option, user_errors


@click.command()
@click.option("--run", required=True, type=click.Path(), help="Run directory with encode-archive codes.")
@option(ServeConfig, "bits", help="Which code length to search.")
@click.option("--archive", "archives", multiple=True, type=click.Path(),
              help="Also serve this run's archive (encoded with RUN's model: encode-archive --archive); repeatable.")
@option(ServeConfig, "host", help="Address to bind (no authentication: bind others only on a trusted network).")
@option(ServeConfig, "port")
@option(ServeConfig, "max_in_flight", help="Queries running at once; more get a 503 with Retry-After at once.")
@option(ServeConfig, "max_per_client", type=int,
        help="Of those, most from one client address (503 past it) [default: half of --max-in-flight].")
@option(ServeConfig, "timeout", help="Seconds a query may take (then 503).")
@option(ServeConfig, "max_upload_mb", help="Largest request body (413).")
@option(ServeConfig, "max_json_kb", help="Largest JSON request body (413, unparsed).")
@option(ServeConfig, "header_timeout", help="Seconds a client may take to send a request's headers.")
@option(ServeConfig, "body_timeout", help="Seconds a client may take to send a request's body (408).")
@option(ServeConfig, "refusal_burst", help="Requests a client address may have refused (4xx) before it is slowed.")
@option(ServeConfig, "refusal_rate", help="Refused requests a second a client address gets past its burst; its "
                                          "other requests wait (0: no limit).")
@option(ServeConfig, "max_batch", help="Most captions coded in one text-encoder pass (1: no batching).")
@option(ServeConfig, "max_image_batch", help="Most uploaded images coded in one encoder pass (batches pay on a GPU).")
@option(ServeConfig, "threads", type=int, help="Torch threads for coding queries [default: torch's, every core].")
@click.option("--cors", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Let pages from this origin call the API (e.g. https://maps.example.org); off by default.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME[:PORT]",
              help="Also answer requests for this Host (a reverse proxy's public name); repeatable.")
@device_option(ServeConfig)
@runtime_option(ServeConfig)
@click.option("--no-verify", is_flag=True, help="Check code files' sizes only at start, not their SHA-256.")
@option(ServeConfig, "basemap", metavar="URL",
        help="Scene archives' map: an XYZ tile URL template ({z}/{x}/{y}) drawn beneath the footprints, fetched by "
             "the browser [default: none, the map is drawn offline].")
@option(ServeConfig, "basemap_attribution", metavar="TEXT", help="Credit shown on the map under the basemap.")
@user_errors
def serve(no_verify, **settings):
    """Search service and web page over the encoded archive (http://127.0.0.1:8000/, API docs at /docs)."""
    from duch.pipeline.serve.app import create_app, serve_forever

    cfg = ServeConfig(verify=not no_verify, **settings)
    cfg.validate()
    if not cfg.loopback():
        click.echo(f"warning: binding {cfg.host}: the service is reachable from other machines and has no "
                   "authentication", err=True)
    serve_forever(create_app(cfg), lambda line: click.echo(line, err=True))

