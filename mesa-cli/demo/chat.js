// The chat demo's page: nickname login, messages, who is online, a typing
// indicator, and a banner while the connection is down. The room's protocol is
// described in mesa-cli/src/demo.rs.
import { MesaClient } from '/mesa-client.js'

const $ = id => document.getElementById(id)
const endpoint = document.querySelector('meta[name="mesa-endpoint"]').content
const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}${endpoint}`

const client = new MesaClient(url)
window.mesa = client // for the console and the browser tests
let me = null

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

// Who is online is only known while connected: the list greys out (you included)
// until the server sends it again.
function staleOnline () {
  $('online').classList.add('stale')
  for (const item of $('online').children) {
    if (item.dataset.id === me) item.textContent = `${me} (you, offline)`
  }
}

client.on('disconnected', ({ code, reason, reconnectAt }) => {
  status(false)
  staleOnline()
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
  client.send('WHO')
})

// ----- messages -----

// The room's history stays in the page across reconnections and comes back with the
// page (kept per nickname in localStorage, the last HISTORY_MAX messages), so that
// coming back shows what was said before, and what was missed (with --sync) after it.
const HISTORY_MAX = 200
let history = []
const historyKey = () => `mesa-demo-history:${me}`
const messageKey = ({ from, text, at }) => `${at}|${from}|${text}`
let seen = new Set()

function loadHistory () {
  try {
    history = JSON.parse(localStorage.getItem(historyKey()) || '[]')
  } catch {
    history = []
  }
  seen = new Set(history.map(entry => messageKey(entry.d)))
  for (const entry of history) addMessage(entry.d, entry.missed)
}

function remember (d, missed) {
  const key = messageKey(d)
  if (seen.has(key)) return false
  seen.add(key)
  history.push({ d: { from: d.from, text: d.text, at: d.at }, missed })
  if (history.length > HISTORY_MAX) history.splice(0, history.length - HISTORY_MAX)
  try { localStorage.setItem(historyKey(), JSON.stringify(history)) } catch {}
  return true
}

function addMessage ({ from, text, at }, missed) {
  const item = document.createElement('li')
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

const typists = new Map() // nickname -> timer that forgets them
function showTypists () {
  const names = [...typists.keys()]
  $('typing').textContent = names.length === 0
    ? ''
    : `${names.join(', ')} ${names.length === 1 ? 'is' : 'are'} typing…`
}

client.on('message', ({ t, d, s }) => {
  if (t === 'CHAT') {
    typists.delete(d.from)
    showTypists()
    if (remember(d, s !== null)) addMessage(d, s !== null)
  } else if (t === 'ONLINE') {
    $('online').classList.remove('stale')
    $('online').replaceChildren(...d.ids.map(id => {
      const item = document.createElement('li')
      item.dataset.id = id
      item.textContent = id === me ? `${id} (you)` : id
      return item
    }))
  } else if (t === 'TYPING') {
    clearTimeout(typists.get(d.from))
    if (d.typing) typists.set(d.from, setTimeout(() => { typists.delete(d.from); showTypists() }, 5000))
    else typists.delete(d.from)
    showTypists()
  }
})

// ----- the forms -----

$('login-form').addEventListener('submit', async event => {
  event.preventDefault()
  me = $('nick').value.trim()
  if (!me) return
  $('login').classList.add('hidden')
  $('room').classList.remove('hidden')
  $('people').classList.remove('hidden')
  status(false)
  loadHistory()
  client.connect()
  // Dev authentication: the token is the nickname.
  await client.authenticate({ token: me }, { shouldSync: true })
  $('text').focus()
})

let typing = false
let typingTimer = null
function setTyping (now) {
  clearTimeout(typingTimer)
  if (now) typingTimer = setTimeout(() => setTyping(false), 2000)
  if (now === typing || !client.ready()) return
  typing = now
  client.send('TYPING', { typing })
}

$('text').addEventListener('input', () => setTyping($('text').value !== ''))
$('composer').addEventListener('submit', event => {
  event.preventDefault()
  const text = $('text').value.trim()
  if (!text) return
  setTyping(false)
  client.send('CHAT', { text }) // queued while offline
  $('text').value = ''
})
