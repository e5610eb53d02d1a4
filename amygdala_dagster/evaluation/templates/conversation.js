function amyColor(z, thr){
  if(z===null||thr===null) return 'transparent';
  var f=Math.max(0,Math.min(1.5,z/Math.max(thr,1e-6)));
  if(z<=0) return 'transparent';
  var a=Math.min(0.85,0.08+0.5*f); var r=f>=1?'200,0,0':'255,120,0';
  return 'rgba('+r+','+a.toFixed(3)+')';
}
function amyPaint(id){
  var d=JSON.parse(document.getElementById('data-'+id).textContent);
  var sel=document.getElementById('sel-'+id); var c=sel.value;
  var spans=document.querySelectorAll('#tok-'+id+' span[data-i]');
  spans.forEach(function(s){var i=+s.dataset.i; var z=d.z[c][i]; var ok=d.scored[i];
    s.style.background=ok?amyColor(z,d.thr[c]):'transparent';
    s.classList.toggle('hit', ok&&d.raw[c][i]!==null&&d.thrRaw[c]!==null&&d.raw[c][i]>=d.thrRaw[c]);});
}
document.addEventListener('DOMContentLoaded',function(){
  document.querySelectorAll('select[data-conv]').forEach(function(s){amyPaint(s.dataset.conv);
    s.addEventListener('change',function(){amyPaint(s.dataset.conv);});});
});
