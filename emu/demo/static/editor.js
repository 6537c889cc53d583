// The editor's page (emu/demo/editor.py serves it). Every image is a number the server gives; the page
// keeps which one is on the board, the pictures before it (undo), the mask being painted, the window
// being slid, and the jobs it is waiting for.
'use strict';

const $ = (id) => document.getElementById(id);
const state = {
  config: null,
  current: null,      // {id, width, height} of the picture on the board
  undo: [],           // earlier pictures
  zoom: 1,
  zoomed: false,      // the person chose the zoom: keep it
  painting: false,    // the eraser is on
  extending: false,   // the outpaint window is shown
  window: [0, 0],     // its left, top in the picture's pixels
  jobs: new Map(),    // id -> last status, for the jobs this page waits for
  uploads: [],        // {id, width, height} of images added for fusion
};
const ZOOMS = [0.25, 0.5, 1, 2, 3, 4, 6, 8, 12, 16, 24];  // below 1 for real models' 512 to 1024-pixel pictures

// -- talking to the server -------------------------------------------------------

async function answer(res) {
  if (!res.ok) throw new Error((await res.text()).trim());
  return res.json();
}
const getJSON = (url) => fetch(url).then(answer);
const postJSON = (url, body) =>
  fetch(url, {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)}).then(answer);
const postImage = (kind, blob) =>
  fetch(`/api/upload?kind=${kind}`, {method: 'POST', headers: {'Content-Type': blob.type}, body: blob}).then(answer);

function say(text, error = false) {
  $('status').textContent = text;
  $('status').className = error ? 'error' : '';
}

// -- the request every mode shares ------------------------------------------------

function aspect() {
  return document.querySelector('input[name=aspect]:checked').value;
}

function settings(mode) {
  const seed = $('seed').value === '' ? null : Number($('seed').value);
  return {mode, prompt: $('prompt').value.trim(), style: $('style').value, aspect: aspect(), seed,
          cfg: Number($('cfg').value), steps: Number($('steps').value)};
}

async function submit(request) {
  try {
    const {id} = await postJSON('/api/generate', request);
    track(id);
  } catch (e) {
    say(e.message, true);
  }
}

// -- jobs: the queue, progress, cancel ----------------------------------------------

function track(id) {
  if (state.jobs.has(id)) return;
  state.jobs.set(id, {state: 'queued'});
  const item = document.createElement('li');
  item.id = `job-${id}`;
  item.innerHTML = '<span class="what"></span><button type="button">Cancel</button>';
  item.querySelector('button').addEventListener('click', () => postJSON('/api/cancel', {id}).catch((e) => say(e.message, true)));
  $('jobs').appendChild(item);
  poll(id);
}

async function poll(id) {
  let job;
  try {
    job = await getJSON(`/api/job?id=${id}`);
  } catch (e) {
    setTimeout(() => poll(id), 1000);  // the server may be restarting: keep asking
    return;
  }
  state.jobs.set(id, job);
  const what = document.querySelector(`#job-${id} .what`);
  if (job.state === 'queued') {
    what.textContent = `#${id} waiting: ${job.ahead} ahead of it`;
  } else if (job.state === 'running') {
    what.textContent = `#${id} drawing: step ${job.step} of ${job.steps}`;
    if (job.preview) showPreview(id, job.step);
  }
  if (job.state === 'queued' || job.state === 'running') {
    setTimeout(() => poll(id), 200);
    return;
  }
  $(`job-${id}`).remove();
  $('preview').hidden = true;
  if (job.state === 'done') {
    const {width, height} = await imageSize(id);
    show({id, width, height});
    say(`#${id} done.`);
    loadHistory();
  } else if (job.state === 'failed') {
    say(`#${id} failed: ${job.error}`, true);
  } else {
    say(`#${id} cancelled.`);
  }
}

function showPreview(id, step) {
  const preview = $('preview');
  preview.onload = () => {
    preview.style.width = `${preview.naturalWidth * state.zoom}px`;
    preview.style.height = `${preview.naturalHeight * state.zoom}px`;
    preview.hidden = false;
  };
  preview.src = `/api/preview?id=${id}&step=${step}`;
}

function imageSize(id) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve({width: img.naturalWidth, height: img.naturalHeight});
    img.onerror = reject;
    img.src = `/api/image?id=${id}`;
  });
}

// -- the board: the picture, zoom, undo, save --------------------------------------

function show(picture, remember = true) {
  if (remember && state.current) state.undo.push(state.current);
  state.current = picture;
  clearMask();
  setExtending(false);
  $('picture').src = `/api/image?id=${picture.id}`;
  $('picture').hidden = false;
  $('save').href = `/api/image?id=${picture.id}&download=1`;
  $('save').download = `emu-${String(picture.id).padStart(4, '0')}.png`;
  $('save').hidden = false;
  $('size').textContent = `${picture.width} × ${picture.height}`;
  if (!state.zoomed) state.zoom = fitZoom(picture);
  layout();
  showCommand(picture.id);
  enableButtons();
}

async function showCommand(id) {
  try {
    const job = await getJSON(`/api/job?id=${id}`);
    $('command').textContent = job.command;
    $('meta').hidden = false;
  } catch (e) {
    $('meta').hidden = true;  // an upload: nothing drew it
  }
}

function fitZoom(picture) {
  const fits = ZOOMS.filter((z) => picture.width * z <= 640 && picture.height * z <= 400);
  return fits.length ? fits[fits.length - 1] : ZOOMS[0];
}

function margin() {
  // room around the picture for the outpaint window: one window on each side
  if (!state.extending) return [0, 0];
  const [w, h] = state.config.aspects[aspect()];
  return [w, h];
}

function layout() {
  const p = state.current;
  if (!p) return;
  const z = state.zoom;
  const [mx, my] = margin();
  const board = $('board');
  board.style.width = `${(p.width + 2 * mx) * z}px`;
  board.style.height = `${(p.height + 2 * my) * z}px`;
  for (const el of [$('picture'), $('mask'), $('preview')]) {
    el.style.left = `${mx * z}px`;
    el.style.top = `${my * z}px`;
  }
  for (const el of [$('picture'), $('mask')]) {
    el.style.width = `${p.width * z}px`;
    el.style.height = `${p.height * z}px`;
  }
  $('zoom-level').textContent = `${z}×`;
  placeWindow();
}

function zoomBy(direction) {
  const i = ZOOMS.indexOf(state.zoom) + direction;
  if (i >= 0 && i < ZOOMS.length) {
    state.zoom = ZOOMS[i];
    state.zoomed = true;
    layout();
  }
}

function undo() {
  if (!state.undo.length) return;
  show(state.undo.pop(), false);
}

// -- the eraser: a mask painted over the picture -------------------------------------

function clearMask() {
  const mask = $('mask');
  if (!state.current) return;
  mask.width = state.current.width;
  mask.height = state.current.height;
  mask.getContext('2d').clearRect(0, 0, mask.width, mask.height);
  mask.dataset.painted = '';
  mask.hidden = false;
}

function setPainting(on) {
  state.painting = on;
  $('brush').setAttribute('aria-pressed', String(on));
  $('mask').classList.toggle('off', !on);
  if (on) setExtending(false);
}

function paintAt(event, from) {
  const mask = $('mask');
  const ctx = mask.getContext('2d');
  const x = event.offsetX / state.zoom, y = event.offsetY / state.zoom;
  ctx.strokeStyle = ctx.fillStyle = '#fff';
  ctx.lineCap = 'round';
  ctx.lineWidth = 2 * Number($('brush-size').value);
  ctx.beginPath();
  ctx.moveTo(from ? from[0] : x, from ? from[1] : y);
  ctx.lineTo(x, y);
  ctx.stroke();
  mask.dataset.painted = '1';
  return [x, y];
}

function maskBlob() {
  // white where erased, black elsewhere, at the picture's size
  const out = document.createElement('canvas');
  out.width = state.current.width;
  out.height = state.current.height;
  const ctx = out.getContext('2d');
  ctx.fillStyle = '#000';
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage($('mask'), 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, 'image/png'));
}

async function inpaint() {
  if (!$('mask').dataset.painted) {
    say('Paint over what to redraw with the eraser first.', true);
    return;
  }
  try {
    const {id: mask} = await postImage('mask', await maskBlob());
    await submit({...settings('inpaint'), image: state.current.id, mask});
    setPainting(false);
  } catch (e) {
    say(e.message, true);
  }
}

// -- the outpaint window ---------------------------------------------------------------

function setExtending(on) {
  state.extending = on;
  $('extend').setAttribute('aria-pressed', String(on));
  $('window').hidden = !on;
  if (on) {
    setPainting(false);
    const [w, h] = state.config.aspects[aspect()];
    const m = state.config.multiple, p = state.current;
    // half off the right edge, centred in height
    state.window = [p.width - Math.max(m, Math.floor(w / 2 / m) * m), Math.round((p.height - h) / 2 / m) * m];
  }
  layout();
  enableButtons();
}

function clampWindow([left, top]) {
  const [w, h] = state.config.aspects[aspect()];
  const m = state.config.multiple, p = state.current;
  const snap = (v) => Math.round(v / m) * m;
  left = Math.min(Math.max(snap(left), -w + m), p.width - m);
  top = Math.min(Math.max(snap(top), -h + m), p.height - m);
  return [left, top];
}

function placeWindow() {
  if (!state.extending || !state.current) return;
  const [w, h] = state.config.aspects[aspect()];
  const [mx, my] = margin();
  const z = state.zoom, win = $('window');
  win.style.left = `${(mx + state.window[0]) * z}px`;
  win.style.top = `${(my + state.window[1]) * z}px`;
  win.style.width = `${w * z}px`;
  win.style.height = `${h * z}px`;
  const [left, top] = state.window;
  const inside = left >= 0 && top >= 0 && left + w <= state.current.width && top + h <= state.current.height;
  $('outpaint').disabled = inside || !state.config.modes.includes('outpaint');
}

function dragWindow(event) {
  const win = $('window');
  win.setPointerCapture(event.pointerId);
  const start = [event.clientX, event.clientY], from = state.window.slice();
  const move = (e) => {
    state.window = clampWindow([from[0] + (e.clientX - start[0]) / state.zoom, from[1] + (e.clientY - start[1]) / state.zoom]);
    placeWindow();
  };
  const stop = () => {
    win.removeEventListener('pointermove', move);
    win.removeEventListener('pointerup', stop);
  };
  win.addEventListener('pointermove', move);
  win.addEventListener('pointerup', stop);
}

function nudgeWindow(event) {
  const m = state.config.multiple;
  const moves = {ArrowLeft: [-m, 0], ArrowRight: [m, 0], ArrowUp: [0, -m], ArrowDown: [0, m]};
  if (!moves[event.key]) return;
  event.preventDefault();
  state.window = clampWindow([state.window[0] + moves[event.key][0], state.window[1] + moves[event.key][1]]);
  placeWindow();
}

// -- images for fusion ------------------------------------------------------------------

async function upload(files) {
  for (const file of files) {
    try {
      const picture = await postImage('image', file);
      addUpload(picture);
    } catch (e) {
      say(`${file.name}: ${e.message}`, true);
    }
  }
  $('upload').value = '';
}

function addUpload(picture) {
  state.uploads.push(picture);
  const item = document.createElement('li');
  item.dataset.id = picture.id;
  item.innerHTML = '<img alt=""><label>weight <input type="number" min="0" max="100" step="0.1" value="1"></label>' +
                   '<button type="button" class="open">Open</button><button type="button" class="remove">Remove</button>';
  item.querySelector('img').src = `/api/image?id=${picture.id}`;
  item.querySelector('.open').addEventListener('click', () => show(picture));
  item.querySelector('.remove').addEventListener('click', () => {
    state.uploads = state.uploads.filter((u) => u !== picture);
    item.remove();
    enableButtons();
  });
  $('uploads').appendChild(item);
  enableButtons();
}

function fuse() {
  const items = Array.from($('uploads').children);
  const request = settings('fusion');
  request.images = items.map((li) => Number(li.dataset.id));
  request.weights = items.map((li) => Number(li.querySelector('input').value));
  if (request.prompt) request.weights.push(Number($('prompt-weight').value));
  submit(request);
}

// -- history: every finished drawing, also after a reload or a restart ---------------------

async function loadHistory() {
  const {images, pending} = await getJSON('/api/history');
  const box = $('history');
  box.textContent = '';
  for (const item of images) {
    const img = document.createElement('img');
    img.src = `/api/image?id=${item.id}`;
    img.title = `#${item.id} ${item.mode}: ${item.prompt}`;
    img.dataset.id = item.id;
    img.addEventListener('click', async () => show({id: item.id, ...await imageSize(item.id)}));
    box.appendChild(img);
  }
  for (const id of pending) track(id);
}

// -- wiring ----------------------------------------------------------------------------

function enableButtons() {
  const modes = state.config.modes, has = (m) => modes.includes(m), picture = !!state.current;
  $('inpaint').disabled = !has('inpaint') || !picture;
  $('brush').disabled = !has('inpaint') || !picture;
  $('extend').disabled = !has('outpaint') || !picture;
  $('variations').disabled = !has('variations') || !picture;
  $('add-current').disabled = !has('fusion') || !picture;
  $('fuse').disabled = !has('fusion') || state.uploads.length === 0;
  $('undo').disabled = state.undo.length === 0;
  if (!state.extending) $('outpaint').disabled = true;
  const why = 'needs Kandinsky\u2019s inpainting decoder';
  for (const id of ['inpaint', 'brush', 'extend', 'outpaint']) if (!has('inpaint')) $(id).title = why;
  for (const id of ['variations', 'fuse', 'add-current']) if (!has('fusion')) $(id).title = 'needs Kandinsky\u2019s decoder';
}

async function start() {
  const config = state.config = await getJSON('/api/config');
  for (const name of config.styles) $('style').add(new Option(name, name));
  for (const name of Object.keys(config.aspects)) {
    const label = document.createElement('label');
    label.innerHTML = `<input type="radio" name="aspect"> ${name}`;
    const input = label.querySelector('input');
    input.value = name;
    input.id = `aspect-${name.replace(':', 'x')}`;
    input.checked = name === '1:1';
    input.addEventListener('change', () => setExtending(state.extending));
    $('aspects').appendChild(label);
  }
  $('cfg').value = config.defaults.cfg;
  $('steps').value = config.defaults.steps;
  $('steps').max = config.max_steps;
  $('seed').value = Math.floor(Math.random() * 100000);

  $('generate').addEventListener('click', () => submit(settings('text')));
  $('dice').addEventListener('click', () => { $('seed').value = Math.floor(Math.random() * 100000); });
  $('brush').addEventListener('click', () => setPainting(!state.painting));
  $('clear-mask').addEventListener('click', clearMask);
  $('inpaint').addEventListener('click', inpaint);
  $('extend').addEventListener('click', () => setExtending(!state.extending));
  $('outpaint').addEventListener('click', () => submit({...settings('outpaint'), image: state.current.id, window: state.window}));
  $('variations').addEventListener('click', () => submit({...settings('variations'), image: state.current.id}));
  $('upload').addEventListener('change', (e) => upload(Array.from(e.target.files)));
  $('add-current').addEventListener('click', () => addUpload(state.current));
  $('fuse').addEventListener('click', fuse);
  $('undo').addEventListener('click', undo);
  $('zoom-in').addEventListener('click', () => zoomBy(1));
  $('zoom-out').addEventListener('click', () => zoomBy(-1));

  const mask = $('mask');
  let last = null;
  mask.addEventListener('pointerdown', (e) => {
    if (!state.painting) return;
    mask.setPointerCapture(e.pointerId);
    last = paintAt(e, null);
  });
  mask.addEventListener('pointermove', (e) => { if (last) last = paintAt(e, last); });
  mask.addEventListener('pointerup', () => { last = null; });
  $('window').addEventListener('pointerdown', dragWindow);
  $('window').addEventListener('keydown', nudgeWindow);

  setPainting(false);
  enableButtons();
  await loadHistory();
  document.body.dataset.ready = '1';
}

document.addEventListener('DOMContentLoaded', start);
