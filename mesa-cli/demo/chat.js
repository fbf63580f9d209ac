// The chat demo's page: nickname login, a list of rooms (a few fixed ones and any
// created by name), join and leave, messages and who is online per room, a typing
// indicator, and a banner while the connection is down. The chat's protocol is
// described in mesa-cli/src/demo.rs; the client is clients/js. Who is online is Mesa's
// room presence (docs/protocol.md).
import { MesaClient } from '/mesa-client.js'

const $ = id => document.getElementById(id)
const endpoint = document.querySelector('meta[name="mesa-endpoint"]').content
const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}${endpoint}`

const client = new MesaClient(url)
window.mesa = client // for the console and the browser tests
let me = null

const FIXED_ROOMS = ['general', 'random', 'rust']
// docs/protocol.md's room names.
const ROOM_NAME = /^[A-Za-z0-9_\-.:@/#=+]{1,128}$/
const known = new Set(FIXED_ROOMS) // rooms in the list
const joined = new Set() // rooms this page is in (kept per nickname in localStorage)
let current = 'general' // the room shown
const unread = new Map() // room -> messages arrived while another room was shown

// ----- connection state -----

let countdown = null
function banner (text) {
  clearInterval(countdown)
  $('banner').textContent = text
  $('banner').classList.toggle('hidden', !text)
}

// Before joining the page says so ("not joined"), not "offline".
function status (online) {
  $('status').textContent = online ? `online as ${me}` : 'offline'
  $('status').className = online ? 'online' : 'offline'
}

client.on('disconnected', ({ code, reason, reconnectAt }) => {
  status(false)
  $('online').classList.add('stale')
  showOnline()
  if (reconnectAt === null) return banner(`Disconnected (${code}${reason ? `: ${reason}` : ''}).`)
  const why = `Connection lost (${code}${reason ? `: ${reason}` : ''}).`
  const at = new Date(reconnectAt).toLocaleTimeString()
  const tick = () => {
    const seconds = Math.max(0, Math.ceil((reconnectAt - Date.now()) / 1000))
    $('banner').textContent = `${why} Reconnecting at ${at} (in ${seconds} s)…`
  }
  banner(' ')
  tick()
  countdown = setInterval(tick, 250)
})
client.on('connecting', ({ automatic }) => {
  if (automatic) banner('Reconnecting now…')
})
client.on('authenticated', () => {
  banner('')
  status(true)
})
// Made again after every reconnection: tell the server each time (it keeps the rooms'
// members for their stored messages) and ask again who is there.
client.on('subscribed', ({ room }) => {
  if (!joined.has(room)) return
  client.send('JOIN', { room })
  askOnline(room)
})

// ----- rooms -----

const roomsKey = () => `mesa-demo-rooms:${me}`
function saveRooms () {
  try { localStorage.setItem(roomsKey(), JSON.stringify([...joined])) } catch {}
}
function loadRooms () {
  let saved
  try { saved = JSON.parse(localStorage.getItem(roomsKey()) || '["general"]') } catch { saved = ['general'] }
  return Array.isArray(saved) ? saved.filter(room => ROOM_NAME.test(room)) : ['general']
}

function join (room) {
  known.add(room)
  joined.add(room)
  saveRooms()
  client.subscribe(room, { presence: true }).catch(error => {
    joined.delete(room)
    saveRooms()
    banner(`Cannot join #${room}: ${error.reason || error.message}`)
    showRooms()
  })
}

function leave (room) {
  client.send('LEAVE', { room })
  joined.delete(room)
  online.delete(room)
  saveRooms()
  client.unsubscribe(room).catch(() => {}) // not subscribed yet: nothing to undo
  select(room)
}

function select (room) {
  current = room
  unread.delete(room)
  $('room-title').textContent = `#${room}`
  $('people-title').textContent = `Online in #${room}`
  const inside = joined.has(room)
  $('leave').classList.toggle('hidden', !inside)
  $('enter').classList.toggle('hidden', inside)
  $('text').disabled = $('send').disabled = !inside
  $('messages').replaceChildren()
  for (const entry of history) if (entry.d.room === room) addMessage(entry.d, entry.missed)
  showRooms()
  showOnline()
  showTypists()
}

function showRooms () {
  $('room-list').replaceChildren(...[...known].map(room => {
    const item = document.createElement('li')
    item.dataset.room = room
    item.textContent = `#${room}`
    item.classList.toggle('joined', joined.has(room))
    item.classList.toggle('current', room === current)
    if (unread.get(room)) {
      const count = document.createElement('span')
      count.className = 'unread'
      count.textContent = unread.get(room)
      item.append(count)
    }
    item.addEventListener('click', () => {
      if (!joined.has(room)) join(room)
      select(room)
    })
    return item
  }))
}

// ----- who is online, per room -----

// Set from the room's presence after every subscription, then kept by its joins and
// leaves. The page is in the room, so it lists itself, whether its own join was missed
// (docs/protocol.md) or a leave of its id comes late from a connection it had before.
const online = new Map() // room -> ids

// One request at a time: the server refuses a connection's requests beyond a few
// awaiting answers, and a page rejoins all its rooms at once after a reconnection.
let asking = Promise.resolve()
function askOnline (room) {
  asking = asking.then(() => client.presence(room)).then(members => {
    if (!joined.has(room)) return
    online.set(room, new Set([...Object.keys(members), me]))
    $('online').classList.remove('stale')
    if (room === current) showOnline()
  }, () => {}) // unsubscribed or disconnected meanwhile: the next subscription asks again
}

function changeOnline (room, id, present) {
  const ids = online.get(room)
  if (!ids) return // not in the room, or its presence not in yet
  if (present) ids.add(id)
  else if (id !== me) ids.delete(id)
  if (room === current) showOnline()
}
client.on('join', ({ room, id }) => changeOnline(room, id, true))
client.on('leave', ({ room, id }) => changeOnline(room, id, false))

function showOnline () {
  const stale = $('online').classList.contains('stale')
  $('online').replaceChildren(...[...(online.get(current) || [])].sort().map(id => {
    const item = document.createElement('li')
    item.dataset.id = id
    item.textContent = id === me ? `${id} (you${stale ? ', offline' : ''})` : id
    return item
  }))
}

// ----- messages -----

// The rooms' history stays in the page across reconnections and comes back with the
// page (kept per nickname in localStorage, the last HISTORY_MAX messages), so that
// coming back shows what was said before, and what was missed (with --sync) after it.
const HISTORY_MAX = 200
let history = []
const historyKey = () => `mesa-demo-history:${me}`
const messageKey = ({ room, from, text, at }) => `${room}|${at}|${from}|${text}`
let seen = new Set()

function loadHistory () {
  try {
    history = JSON.parse(localStorage.getItem(historyKey()) || '[]')
  } catch {
    history = []
  }
  seen = new Set(history.map(entry => messageKey(entry.d)))
  for (const entry of history) known.add(entry.d.room)
}

// Keep a message; false when it is a copy of one kept already.
function remember (d, missed) {
  const key = messageKey(d)
  if (seen.has(key)) return false
  seen.add(key)
  history.push({ d: { room: d.room, from: d.from, text: d.text, at: d.at }, missed })
  if (history.length > HISTORY_MAX) history.splice(0, history.length - HISTORY_MAX)
  try { localStorage.setItem(historyKey(), JSON.stringify(history)) } catch {}
  return true
}

function addMessage ({ room, from, text, at }, missed) {
  const item = document.createElement('li')
  item.dataset.room = room
  if (from === me) item.classList.add('mine')
  if (missed) item.classList.add('missed')
  const time = document.createElement('span')
  time.className = 'at'
  time.textContent = new Date(at).toLocaleTimeString()
  const who = document.createElement('span')
  who.className = 'from'
  who.textContent = from
  const body = document.createElement('span')
  body.className = 'text'
  body.textContent = text
  item.append(time, who, body)
  $('messages').append(item)
  item.scrollIntoView({ block: 'end' })
}

const typists = new Map() // room -> nickname -> timer that forgets them
function showTypists () {
  const names = [...(typists.get(current) || new Map()).keys()]
  $('typing').textContent = names.length === 0
    ? ''
    : `${names.join(', ')} ${names.length === 1 ? 'is' : 'are'} typing…`
}
function typist (room, from, typing) {
  if (!typists.has(room)) typists.set(room, new Map())
  const here = typists.get(room)
  clearTimeout(here.get(from))
  if (typing) here.set(from, setTimeout(() => typist(room, from, false), 5000))
  else here.delete(from)
  if (room === current) showTypists()
}

client.on('message', ({ t, d, s, room }) => {
  // A room's messages carry their room; those stored while offline (sent by id)
  // carry it in their data.
  const where = room ?? (d && d.room)
  if (typeof where !== 'string') return
  if (t === 'CHAT') {
    typist(where, d.from, false)
    const missed = s !== null
    if (!remember({ ...d, room: where }, missed)) return
    known.add(where)
    if (where === current) addMessage({ ...d, room: where }, missed)
    else unread.set(where, (unread.get(where) || 0) + 1)
    showRooms()
  } else if (t === 'TYPING') {
    if (d.from !== me) typist(where, d.from, d.typing)
  }
})

// ----- the forms -----

$('login-form').addEventListener('submit', async event => {
  event.preventDefault()
  me = $('nick').value.trim()
  if (!me) return
  $('login').classList.add('hidden')
  for (const id of ['rooms', 'room', 'people']) $(id).classList.remove('hidden')
  status(false)
  loadHistory()
  const rooms = loadRooms()
  for (const room of rooms) join(room)
  select(rooms[0] || 'general')
  client.connect()
  // Dev authentication: the token is the nickname.
  await client.authenticate({ token: me }, { shouldSync: true })
  $('text').focus()
})

$('new-room').addEventListener('submit', event => {
  event.preventDefault()
  const room = $('room-name').value.trim()
  if (!ROOM_NAME.test(room)) return banner(`A room name is 1 to 128 letters, digits or _ - . : @ / # = +`)
  $('room-name').value = ''
  join(room)
  select(room)
})
$('enter').addEventListener('click', () => {
  join(current)
  select(current)
})
$('leave').addEventListener('click', () => leave(current))

let typing = false
let typingTimer = null
function setTyping (now) {
  clearTimeout(typingTimer)
  if (now) typingTimer = setTimeout(() => setTyping(false), 2000)
  if (now === typing || !client.ready()) return
  typing = now
  client.send('TYPING', { room: current, typing })
}

$('text').addEventListener('input', () => setTyping($('text').value !== ''))
$('composer').addEventListener('submit', event => {
  event.preventDefault()
  const text = $('text').value.trim()
  if (!text || !joined.has(current)) return
  setTyping(false)
  client.send('CHAT', { room: current, text }) // queued while offline
  $('text').value = ''
})
