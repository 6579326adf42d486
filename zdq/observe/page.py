"""The ``/zdq`` page on the Dask dashboard (the scheduler's HTTP server).

Two routes, added to the scheduler's running tornado application: ``/zdq`` (a self-contained page,
no external script) and ``/zdq/status.json`` (the monitor's :meth:`~zdq.observe.monitor.Monitor.status`),
which the page polls every second. Every figure it renders carries ``data-field`` and the queue's or
consumer's name, so that a test (or a scraper) can read them back.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from tornado import web

__all__ = ["add_routes", "PAGE_PATH", "STATUS_PATH"]

logger = logging.getLogger(__name__)

PAGE_PATH = "/zdq"
STATUS_PATH = "/zdq/status.json"


class _StatusHandler(web.RequestHandler):
    def initialize(self, monitor: Any) -> None:
        self.monitor = monitor

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.write(json.dumps(self.monitor.status(), allow_nan=False))


class _PageHandler(web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(_HTML)


def add_routes(dask_scheduler: Any) -> None:
    app = getattr(dask_scheduler, "http_application", None)
    if app is None:
        logger.info("the scheduler serves no dashboard: no /zdq page")
        return
    monitor = dask_scheduler.extensions["zdq"]
    app.add_handlers(
        r".*$",
        [(PAGE_PATH + r"/?", _PageHandler), (STATUS_PATH, _StatusHandler, {"monitor": monitor})],
    )


_HTML = r"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>zdq pools</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .3em} h2{font-size:1.1em;margin:1.2em 0 .3em}
table{border-collapse:collapse;margin:.3em 0 .8em;font-size:.9em;background:#fff}
th,td{border:1px solid #ddd;padding:.2em .6em;text-align:right} th{background:#eef}
td.n{text-align:left;white-space:nowrap} .pool{border:1px solid #ccd;padding:.4em 1em;margin:.8em 0;background:#fff;width:fit-content}
.muted{color:#777;font-size:.85em} svg{background:#fff;border:1px solid #ddd}
.legend span{margin-right:1em} .sub{color:#1f77b4} .com{color:#2ca02c} .fail{color:#d62728}
</style></head>
<body>
<h1>zdq: live pools</h1>
<div class="muted" id="meta">loading…</div>
<div id="pools"></div>
<script>
"use strict";
const QCOLS=[["name","queue"],["host","host"],["durable","durable"],["ready_tasks","ready"],["delayed_tasks","delayed"],["leased_tasks","leased"],
 ["awaiting_tasks","awaiting receipt"],["dead_tasks","dead-lettered"],["kept_tasks","kept results"],["tasks_stored","submitted"],["tasks_acked","acked"],
 ["chunks_redelivered","redelivered chunks"],["unique_keys","unique keys"],["tasks_unique_duplicates","unique duplicates"],["tasks_expired","expired"],["recoveries","recoveries"],["bad_messages","bad messages"],["refused_peers","refused peers"],["consumers","consumers"],
 ["rate_limit","rate limit /s"],["throttled_tasks","throttled"]];
const CCOLS=[["name","consumer"],["worker","where"],["state","state"],["tasks_done","done"],["tasks_failed","failed"],
 ["tasks_retried","retried"],["tasks_in_flight","in flight"],["rate","tasks/s"]];
const TCOLS=[["submitted","submitted"],["completed","completed"],["failed","failed"],["retried","retried"],
 ["dead_lettered","dead-lettered"],["expired","expired"],["redelivered","redelivered chunks"],["recoveries","recoveries"],["bad_messages","bad messages"],["refused_peers","refused peers"],["consumers","live consumers"]];
function esc(s){return String(s).replace(/[&<>"]/g,c=>({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));}
function cell(key,v,attrs){const n=typeof v==="number";return `<td class="${n?"":"n"}" ${attrs} data-field="${key}">${esc(v)}</td>`;}
function table(cols,rows,kind,pool){
 let h="<table><tr>"+cols.map(c=>`<th>${c[1]}</th>`).join("")+"</tr>";
 for(const r of rows){h+="<tr>"+cols.map(c=>cell(c[0],r[c[0]]??"",`data-pool="${esc(pool)}" data-${kind}="${esc(r.name)}"${r.id?` data-id="${esc(r.id)}"`:""}`)).join("")+"</tr>";}
 return h+"</table>";}
function plot(r){
 const W=520,H=140,P=30; if(!r.t.length) return "<div class='muted'>no rate yet</div>";
 const all=[...r.submitted,...r.completed,...r.failed]; const ymax=Math.max(1,...all); const tmin=Math.min(...r.t);
 const x=t=>P+(W-P-5)*(tmin===0?1:(t-tmin)/(0-tmin)); const y=v=>H-18-(H-28)*v/ymax;
 const line=(k,c)=>`<polyline fill="none" stroke="${c}" stroke-width="2" points="${r.t.map((t,i)=>x(t)+","+y(r[k][i])).join(" ")}"/>`;
 return `<svg width="${W}" height="${H}"><text x="2" y="12" font-size="10">${ymax.toFixed(0)}/s</text>
 <text x="2" y="${H-20}" font-size="10">0</text><text x="${P}" y="${H-4}" font-size="10">${tmin.toFixed(0)} s</text>
 <text x="${W-30}" y="${H-4}" font-size="10">now</text>
 ${line("submitted","#1f77b4")}${line("completed","#2ca02c")}${line("failed","#d62728")}</svg>
 <div class="legend muted"><span class="sub">■ submitted</span><span class="com">■ completed</span><span class="fail">■ failed</span> tasks per second</div>`;}
function render(s){
 const names=Object.keys(s.pools);
 document.getElementById("meta").textContent=`${names.length} live pool(s); reports every ${s.interval}s; ${s.reports} reports received; updated ${new Date().toLocaleTimeString()}`;
 let h=""; if(!names.length) h="<p>No live zdq pool on this cluster.</p>";
 for(const name of names){const p=s.pools[name];
  for(const c of p.consumers){c.state=c.running?"running":"idle";}
  h+=`<div class="pool" data-pool-name="${esc(name)}"><h2>${esc(name)}</h2>`+table(TCOLS,[Object.assign({name:name},p.totals)],"totals",name)
   +plot(p.rates)+"<h3>Queues</h3>"+table(QCOLS,p.queues,"queue",name)+"<h3>Consumers</h3>"+table(CCOLS,p.consumers,"consumer",name)+"</div>";}
 document.getElementById("pools").innerHTML=h;}
async function refresh(){
 try{const r=await fetch(location.pathname.replace(/\/?$/,"/")+"status.json",{cache:"no-store"}); render(await r.json());}
 catch(e){document.getElementById("meta").textContent="cannot reach the scheduler: "+e;}
 setTimeout(refresh,1000);}
refresh();
</script></body></html>
"""
