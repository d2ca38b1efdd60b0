"""The status page served at ``/``: plain HTML with a little inline JS and SVG, nothing fetched
from anywhere but this server.

The page asks for a token (the join token, or a client token, which sees only itself among
the participants), keeps it in the tab's ``sessionStorage`` (a ``#token=...`` fragment works
too and never reaches the server) and reads ``/v1/status`` with it every few seconds: the
current round, rounds so far, clients per family and tier, accuracy/perplexity curves from the
clients' reported metrics, megabytes uploaded per round, and the last errors.
"""

from __future__ import annotations

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>EdgeTune server</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;max-width:1100px}
h1{font-size:1.4em;margin:0 0 .5em} h2{font-size:1.1em;margin:1.2em 0 .4em}
table{border-collapse:collapse;margin:.3em 0} td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left} #err{color:#a00} .muted{color:#777}
.charts{display:flex;flex-wrap:wrap;gap:1em} figure{margin:0} figcaption{font-weight:600}
svg text{font-size:11px;fill:#444} #errors li{overflow-wrap:anywhere}
</style></head><body>
<h1>EdgeTune server <span id="strategy" class="muted"></span></h1>
<form id="login">Token: <input id="token" type="password" size="40" autocomplete="off"
 placeholder="join token or client token"> <button>Show status</button></form>
<p id="err"></p>
<div id="view" hidden>
<p id="current"></p>
<h2>Rounds</h2><table id="rounds"><thead><tr><th>round</th><th class="l">state</th>
<th>uploads</th><th class="l">families</th><th>MB in</th><th>seconds</th></tr></thead><tbody></tbody></table>
<h2>Clients</h2><table id="clients"><thead><tr><th class="l">family</th><th class="l">tier</th>
<th>clients</th></tr></thead><tbody></tbody></table>
<h2>Curves</h2><div id="charts" class="charts"></div>
<h2>Last errors</h2><ul id="errors"></ul>
</div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const COLORS = ["#1f77b4","#d62728","#2ca02c","#ff7f0e","#9467bd","#8c564b","#e377c2","#17becf"];
function esc(s){return String(s).replace(/[&<>"']/g,c=>"&#"+c.charCodeAt(0)+";");}
function row(cells){return "<tr>"+cells.map(([v,cls])=>`<td class="${cls||""}">${esc(v)}</td>`).join("")+"</tr>";}
function token(){
  const m = location.hash.match(/token=([^&]+)/);
  if (m) { sessionStorage.setItem("edgetune-token", decodeURIComponent(m[1])); history.replaceState(null,"",location.pathname); }
  return sessionStorage.getItem("edgetune-token") || "";
}
function chart(title, series){
  // series: [{name, points:[[x,y],...]}]; integer rounds on x
  const W=360,H=200,L=44,B=26,T=8,R=10, pts=series.flatMap(s=>s.points);
  if(!pts.length) return "";
  const xs=pts.map(p=>p[0]), ys=pts.map(p=>p[1]);
  const x0=Math.min(...xs), x1=Math.max(...xs, x0+1);
  let y0=Math.min(...ys), y1=Math.max(...ys); if(y1-y0<1e-9){y0-=0.5;y1+=0.5;}
  const sx=x=>L+(x-x0)/(x1-x0)*(W-L-R), sy=y=>T+(1-(y-y0)/(y1-y0))*(H-T-B);
  let g=`<line x1="${L}" y1="${H-B}" x2="${W-R}" y2="${H-B}" stroke="#999"/><line x1="${L}" y1="${T}" x2="${L}" y2="${H-B}" stroke="#999"/>`;
  const step=Math.max(1,Math.ceil((x1-x0)/8));
  for(let x=x0;x<=x1;x+=step) g+=`<text x="${sx(x)}" y="${H-B+14}" text-anchor="middle">${x}</text>`;
  for(const y of [y0,(y0+y1)/2,y1]) g+=`<text x="${L-4}" y="${sy(y)+4}" text-anchor="end">${+y.toPrecision(3)}</text>`;
  series.forEach((s,i)=>{
    const c=COLORS[i%COLORS.length], d=s.points.map((p,j)=>(j?"L":"M")+sx(p[0])+","+sy(p[1])).join(" ");
    g+=`<path d="${d}" fill="none" stroke="${c}" stroke-width="2"/>`;
    g+=s.points.map(p=>`<circle cx="${sx(p[0])}" cy="${sy(p[1])}" r="3" fill="${c}"><title>${esc(s.name)} round ${p[0]}: ${p[1]}</title></circle>`).join("");
  });
  const legend=series.map((s,i)=>`<span style="color:${COLORS[i%COLORS.length]}">&#9632; ${esc(s.name)}</span>`).join(" ");
  return `<figure class="chart" data-metric="${esc(title)}"><figcaption>${esc(title)}</figcaption>`+
    `<svg width="${W}" height="${H}" role="img" aria-label="${esc(title)}">${g}</svg><div>${legend}</div></figure>`;
}
function metricSeries(metrics){
  // metrics: family -> round -> tier -> {key: value}; curves for accuracy and perplexity keys
  const byKey={};
  for(const [fam,rounds] of Object.entries(metrics||{}))
    for(const [r,tiers] of Object.entries(rounds))
      for(const [tier,vals] of Object.entries(tiers))
        for(const [k,v] of Object.entries(vals)){
          if(!/acc|ppl|perplexity/.test(k)) continue;
          const s=((byKey[k]=byKey[k]||{})[fam+" / "+tier]=byKey[k][fam+" / "+tier]||[]);
          s.push([+r,v]);
        }
  return Object.entries(byKey).sort().map(([k,named])=>[k,Object.entries(named).map(([name,p])=>({name,points:p.sort((a,b)=>a[0]-b[0])}))]);
}
function render(st){
  const cur=st.current||{};
  $("strategy").textContent="("+st.strategy+")";
  $("current").textContent=cur.finished ? `Finished after round ${cur.round}.` :
    `Round ${cur.round}: ${cur.state}, ${cur.received}/${cur.min_clients} uploads, ${Math.round(cur.seconds_left)} s to the deadline.`;
  $("rounds").tBodies[0].innerHTML=st.rounds.map(r=>row([[r.round],[r.state,"l"],
    [r.participant_count ?? r.participants.length],[r.families.join(", "),"l"],[(r.bytes_in/1e6).toFixed(3)],
    [r.summary && r.summary.seconds!=null ? r.summary.seconds : ""]])).join("");
  $("clients").tBodies[0].innerHTML=st.clients.map(c=>row([[c.family,"l"],[c.tier,"l"],[c.count]])).join("");
  let mb=0; const up=st.rounds.filter(r=>r.closed_at).map(r=>[r.round, +((mb+=r.bytes_in)/1e6).toFixed(4)]);
  $("charts").innerHTML=metricSeries(st.metrics).map(([k,s])=>chart(k,s)).join("")+
    chart("MB uploaded (cumulative)",[{name:"all families",points:up}]);
  const errs=[];
  for(const r of st.rounds){
    const s=r.summary||{};
    if(s.error) errs.push(`round ${r.round}: ${s.error}`);
    else if(r.state==="abandoned") errs.push(`round ${r.round}: abandoned with ${s.updates??0} uploads`);
    for(const [who,why] of (s.skipped||[])) errs.push(`round ${r.round}: ${who} skipped: ${why}`);
  }
  $("errors").innerHTML=errs.slice(-10).map(e=>`<li>${esc(e)}</li>`).join("")||'<li class="muted">none</li>';
  $("view").hidden=false; document.body.dataset.rounds=st.rounds.length;
}
let timer=null;
async function refresh(){
  const t=token(); if(!t){$("err").textContent="Enter the server's join token (or a client token)."; return;}
  try{
    const r=await fetch("/v1/status",{headers:{Authorization:"Bearer "+t},cache:"no-store"});
    const body=await r.json();
    if(!r.ok){$("err").textContent=`${r.status}: ${body.detail||body.error}`; $("view").hidden=true; return;}
    $("err").textContent=""; render(body);
  }catch(e){$("err").textContent="server unreachable: "+e.message;}
  clearTimeout(timer); timer=setTimeout(refresh,3000);
}
$("login").addEventListener("submit",ev=>{ev.preventDefault(); sessionStorage.setItem("edgetune-token",$("token").value.trim()); refresh();});
refresh();
</script></body></html>
"""
