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

function status (online) {
  $('status').textContent = online ? `online as ${me}` : 'offline'
  $('status').className = online ? 'online' : 'offline'
}

client.on('disconnected', ({ code, reason, reconnectAt }) => {
  status(false)
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
    addMessage(d, s !== null)
  } else if (t === 'ONLINE') {
    $('online').replaceChildren(...d.ids.map(id => {
      const item = document.createElement('li')
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
